//! The target node must hold the very images the source containers run: CRIU restores
//! memory that refers to the image's files, so another image (or none) fails the
//! restore after the source froze. Checked through the node's CRI with `crictl`.
use super::Cri;
use crate::error::RuntimeError;
use crate::runtime::ContainerImage;
use tokio::process::Command;

/// What the CRI says of one image.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ImageStatus {
    pub id: String,
    pub repo_digests: Vec<String>,
}

impl ImageStatus {
    fn from_json(v: &serde_json::Value) -> ImageStatus {
        let s = &v["status"];
        ImageStatus {
            id: s["id"].as_str().unwrap_or_default().to_string(),
            repo_digests: s["repoDigests"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|d| d.as_str().map(str::to_string))
                .collect(),
        }
    }

    /// Whether this is the image the source kubelet calls `image_id` (an image ID or
    /// a `repo@digest`; the registry name may differ between clusters, the digest may not).
    pub fn matches(&self, image_id: &str) -> bool {
        if image_id.is_empty() {
            return true;
        }
        let digest = |s: &str| {
            s.rsplit_once('@')
                .map(|(_, d)| d.to_string())
                .unwrap_or_else(|| s.to_string())
        };
        let want = digest(image_id);
        self.id == want || self.repo_digests.iter().any(|d| digest(d) == want)
    }
}

/// Refuses, with the reason, when a source image is missing here or differs.
pub async fn check(cri: &Cri, images: &[ContainerImage]) -> Result<(), RuntimeError> {
    for i in images {
        let out = Command::new(&cri.crictl)
            .args([
                "--runtime-endpoint",
                &cri.endpoint,
                "--image-endpoint",
                &cri.endpoint,
            ])
            .args(["inspecti", "-o", "json", &i.image])
            .output()
            .await
            .map_err(RuntimeError::io(format!(
                "running {}",
                cri.crictl.display()
            )))?;
        if !out.status.success() {
            return Err(RuntimeError::FailedPrecondition(format!(
                "image {} of container {} is not on this node ({}); ferry restores into the \
                 exact image the source runs: pull or import it here first",
                i.image,
                i.container,
                // crictl's last line is its verdict; earlier ones are config warnings.
                String::from_utf8_lossy(&out.stderr)
                    .trim()
                    .lines()
                    .last()
                    .unwrap_or_default()
            )));
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let st = ImageStatus::from_json(&v);
        if !st.matches(&i.image_id) {
            return Err(RuntimeError::FailedPrecondition(format!(
                "image {} of container {} differs on this node ({}) from the source's ({}); \
                 ferry restores only into the same image",
                i.image, i.container, st.id, i.image_id
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_match_across_registry_names() {
        let st = ImageStatus::from_json(&serde_json::json!({"status": {
            "id": "sha256:cfg", "repoDigests": ["docker.io/library/busybox@sha256:man"]}}));
        assert!(st.matches("docker.io/library/busybox@sha256:man"));
        assert!(st.matches("mirror.local/busybox@sha256:man"));
        assert!(st.matches("sha256:cfg"));
        assert!(st.matches(""));
        assert!(!st.matches("docker.io/library/busybox@sha256:other"));
    }
}
