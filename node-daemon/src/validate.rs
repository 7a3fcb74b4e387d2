//! The rules every value the node daemon's gRPC API receives must meet before it is
//! used: as a map key, as part of a path under the daemon's directories, or as a
//! program's argument. Pure functions; `convert.rs` applies them to requests and turns a
//! refusal into `RuntimeError::InvalidArgument` (gRPC INVALID_ARGUMENT).
//!
//! Each check takes the field's name as the caller knows it (`target.namespace`) and
//! returns a message that names the field, shows the value, says what is wrong with it
//! and states the rule, so that whoever sent it can fix it.
//!
//! The names are Kubernetes' own rules, which every value the controller sends meets:
//! namespaces and container names are RFC 1123 labels, pod names RFC 1123 subdomains,
//! pod UIDs lowercase UUIDs. None of them can hold `/`, start with `.` or `-`, or be
//! empty, so none can leave a directory it is joined to or pass for a program's option.
//! [`inside`] checks, independently, that a path built from them stayed inside its root.
use std::path::{Component, Path};

/// RFC 1123 label: namespaces, container names.
const LABEL_MAX: usize = 63;
/// RFC 1123 subdomain: pod names.
const SUBDOMAIN_MAX: usize = 253;
/// containerd's identifier limit.
const CONTAINER_ID_MAX: usize = 76;
/// Longer than any image reference a registry accepts.
const IMAGE_REF_MAX: usize = 1024;
/// A host name (253) or a bracketed IPv6 address, a colon and a port.
const ENDPOINT_MAX: usize = 300;

const LABEL_RULE: &str = "an RFC 1123 label: 1 to 63 characters, only lowercase letters a-z, \
     digits 0-9 and '-', starting and ending with a letter or digit";
const SUBDOMAIN_RULE: &str = "an RFC 1123 subdomain: 1 to 253 characters, RFC 1123 labels \
     (lowercase letters a-z, digits 0-9 and '-', each starting and ending with a letter or \
     digit) joined by '.'";
const UID_RULE: &str = "a UUID as Kubernetes writes it: 36 characters, lowercase hex digits \
     0-9 a-f in groups of 8-4-4-4-12 separated by '-' (e.g. \
     0b7c5a8e-1f0e-4c2a-9d8e-2f3a4b5c6d7e)";
const MIGRATION_ID_RULE: &str = "the Migration's UID (its metadata.uid, a UUID such as \
     0b7c5a8e-1f0e-4c2a-9d8e-2f3a4b5c6d7e) or another RFC 1123 label: 1 to 63 characters, \
     only lowercase letters a-z, digits 0-9 and '-', starting and ending with a letter or digit";
const CONTAINER_ID_RULE: &str = "a containerd container id: 1 to 76 characters, letters, \
     digits and single '.', '_' or '-' between them";
const IMAGE_RULE: &str = "an image reference such as docker.io/library/busybox:1.36 or \
     busybox@sha256:<digest>: 1 to 1024 characters, letters, digits and . _ - / : @ +, \
     starting with a letter or digit";
const ENDPOINT_RULE: &str = "host:port, the host a name or IP address (IPv6 in brackets), \
     the port 1-65535";

/// The value as a message shows it: quoted and escaped, cut short if long.
fn shown(s: &str) -> String {
    const MAX: usize = 80;
    let n = s.chars().count();
    if n <= MAX {
        format!("{s:?}")
    } else {
        let head: String = s.chars().take(MAX).collect();
        format!("{head:?}… ({n} characters)")
    }
}

fn refuse(field: &str, value: &str, what: &str, why: &str, rule: &str) -> String {
    format!(
        "{field} {} is not {what}: {why}; it must be {rule}",
        shown(value)
    )
}

/// Why the character `c`, the `pos`-th (from 1), is not allowed.
fn bad_char(pos: usize, c: char) -> String {
    match c {
        'A'..='Z' => format!("character {pos} is the uppercase letter {c:?} (use lowercase)"),
        '/' | '\\' => format!("character {pos} is {c:?}, a path separator"),
        c if !c.is_ascii() => format!("character {pos} is {c:?}, which is not ASCII"),
        c if c.is_ascii_control() || c == ' ' => {
            format!("character {pos} is {c:?}, a space or control character")
        }
        c => format!("character {pos} is {c:?}, which is not allowed"),
    }
}

/// The first character of `s` that `ok` refuses, as a reason.
fn first_bad(s: &str, ok: impl Fn(char) -> bool) -> Option<String> {
    s.chars()
        .enumerate()
        .find(|&(_, c)| !ok(c))
        .map(|(i, c)| bad_char(i + 1, c))
}

fn too_long(s: &str, max: usize) -> Option<String> {
    (s.len() > max).then(|| format!("it is {} bytes long, more than {max}", s.len()))
}

fn label_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'
}

/// Why `s` is not an RFC 1123 label (of at most `max` characters), if it is not.
fn label_problem(s: &str, max: usize) -> Option<String> {
    if s.is_empty() {
        return Some("it is empty".into());
    }
    first_bad(s, label_char)
        .or_else(|| s.starts_with('-').then(|| "it starts with '-'".into()))
        .or_else(|| s.ends_with('-').then(|| "it ends with '-'".into()))
        .or_else(|| too_long(s, max))
}

/// An RFC 1123 label (Kubernetes' DNS_LABEL): namespaces, container names.
pub fn dns1123_label(field: &str, s: &str) -> Result<(), String> {
    match label_problem(s, LABEL_MAX) {
        None => Ok(()),
        Some(why) => Err(refuse(field, s, "an RFC 1123 label", &why, LABEL_RULE)),
    }
}

/// An RFC 1123 subdomain (Kubernetes' DNS_SUBDOMAIN): labels joined by dots, at most
/// 253 characters in all. Pod names.
pub fn dns1123_subdomain(field: &str, s: &str) -> Result<(), String> {
    match subdomain_problem(s) {
        None => Ok(()),
        Some(why) => Err(refuse(
            field,
            s,
            "an RFC 1123 subdomain",
            &why,
            SUBDOMAIN_RULE,
        )),
    }
}

fn subdomain_problem(s: &str) -> Option<String> {
    if s.is_empty() {
        return Some("it is empty".into());
    }
    if let Some(why) = first_bad(s, |c| label_char(c) || c == '.') {
        return Some(why);
    }
    for part in s.split('.') {
        if part.is_empty() {
            return Some("it has an empty part (a leading, trailing or doubled '.')".into());
        }
        // Kubernetes limits only the whole name, not each of its labels.
        if let Some(why) = label_problem(part, SUBDOMAIN_MAX) {
            return Some(format!("its part {part:?}: {why}"));
        }
    }
    too_long(s, SUBDOMAIN_MAX)
}

/// A Kubernetes namespace name (an RFC 1123 label).
pub fn namespace(field: &str, s: &str) -> Result<(), String> {
    match label_problem(s, LABEL_MAX) {
        None => Ok(()),
        Some(why) => Err(refuse(
            field,
            s,
            "a Kubernetes namespace name",
            &why,
            LABEL_RULE,
        )),
    }
}

/// A Kubernetes pod name (an RFC 1123 subdomain).
pub fn pod_name(field: &str, s: &str) -> Result<(), String> {
    match subdomain_problem(s) {
        None => Ok(()),
        Some(why) => Err(refuse(
            field,
            s,
            "a Kubernetes pod name",
            &why,
            SUBDOMAIN_RULE,
        )),
    }
}

/// A Kubernetes container name (an RFC 1123 label).
pub fn container_name(field: &str, s: &str) -> Result<(), String> {
    match label_problem(s, LABEL_MAX) {
        None => Ok(()),
        Some(why) => Err(refuse(
            field,
            s,
            "a Kubernetes container name",
            &why,
            LABEL_RULE,
        )),
    }
}

fn uuid_problem(s: &str) -> Option<String> {
    if s.is_empty() {
        return Some("it is empty".into());
    }
    for (i, c) in s.chars().enumerate() {
        let ok = if matches!(i, 8 | 13 | 18 | 23) {
            c == '-'
        } else {
            c.is_ascii_digit() || matches!(c, 'a'..='f')
        };
        if !ok {
            let pos = i + 1;
            return Some(match c {
                '-' => format!("character {pos} is '-', where a hex digit belongs"),
                _ if matches!(i, 8 | 13 | 18 | 23) => {
                    format!("character {pos} is {c:?}, where '-' belongs")
                }
                'A'..='F' => format!("character {pos} is the uppercase {c:?} (use lowercase)"),
                c => bad_char(pos, c),
            });
        }
    }
    let n = s.chars().count();
    (n != 36).then(|| format!("it is {n} characters long, not 36"))
}

/// A Kubernetes object UID as the API server writes it: a lowercase UUID.
pub fn pod_uid(field: &str, s: &str) -> Result<(), String> {
    match uuid_problem(s) {
        None => Ok(()),
        Some(why) => Err(refuse(field, s, "a Kubernetes pod UID", &why, UID_RULE)),
    }
}

/// A migration's id. The controller sends the Migration's metadata.uid, a lowercase
/// UUID; any RFC 1123 label (which every such UUID is) is accepted, so that tools and
/// tests may name migrations readably. It keys the daemon's state, names its transfer
/// streams (`<id>.ram`, `<id>/bundle/<container>`) and a directory under its state dir.
pub fn migration_id(field: &str, s: &str) -> Result<(), String> {
    match label_problem(s, LABEL_MAX) {
        None => Ok(()),
        Some(why) => Err(refuse(field, s, "a migration id", &why, MIGRATION_ID_RULE)),
    }
}

/// A containerd container id (`[A-Za-z0-9]+([._-][A-Za-z0-9]+)*`, at most 76
/// characters; the CRI's are 64 hex digits).
pub fn container_id(field: &str, s: &str) -> Result<(), String> {
    let why = if s.is_empty() {
        Some("it is empty".into())
    } else {
        first_bad(s, |c| {
            c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
        })
        .or_else(|| {
            let sep = |c: char| matches!(c, '.' | '_' | '-');
            let b = s.as_bytes();
            (sep(b[0] as char)
                || sep(b[b.len() - 1] as char)
                || b.windows(2).any(|w| sep(w[0] as char) && sep(w[1] as char)))
            .then(|| "'.', '_' and '-' may only stand singly between letters or digits".into())
        })
        .or_else(|| too_long(s, CONTAINER_ID_MAX))
    };
    match why {
        None => Ok(()),
        Some(why) => Err(refuse(field, s, "a container id", &why, CONTAINER_ID_RULE)),
    }
}

/// An image reference or image id as the kubelet reports them (`busybox:1.36`,
/// `docker.io/library/busybox@sha256:…`, `sha256:…`). It becomes an argument of
/// `crictl`, so it must not start with `-`.
pub fn image_ref(field: &str, s: &str) -> Result<(), String> {
    let why = if s.is_empty() {
        Some("it is empty".into())
    } else {
        first_bad(s, |c| {
            c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/' | ':' | '@' | '+')
        })
        .or_else(|| {
            (!s.starts_with(|c: char| c.is_ascii_alphanumeric()))
                .then(|| "it does not start with a letter or digit".into())
        })
        .or_else(|| too_long(s, IMAGE_REF_MAX))
    };
    match why {
        None => Ok(()),
        Some(why) => Err(refuse(field, s, "an image reference", &why, IMAGE_RULE)),
    }
}

/// `host:port` of a peer (a page server, a receiving daemon). It becomes an argument of
/// CRIU or runc, so it must not start with `-`.
pub fn endpoint(field: &str, s: &str) -> Result<(), String> {
    let why = if s.is_empty() {
        Some("it is empty".into())
    } else if let Some(why) = first_bad(s, |c| {
        c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']')
    }) {
        Some(why)
    } else if let Some(why) = too_long(s, ENDPOINT_MAX) {
        Some(why)
    } else {
        match s.rsplit_once(':') {
            None => Some("it has no ':port'".into()),
            Some((host, port)) => {
                let bracketed = host.starts_with('[') && host.ends_with(']');
                let bare = host.trim_start_matches('[').trim_end_matches(']');
                if bare.is_empty() {
                    Some("its host is empty".into())
                } else if !(bare.starts_with(|c: char| c.is_ascii_alphanumeric())
                    || bracketed && bare.starts_with(':'))
                {
                    Some("its host does not start with a letter or digit".into())
                } else if bare.contains(['[', ']']) || (host.contains(['[', ']']) && !bracketed) {
                    Some("its host has unbalanced brackets".into())
                } else if !matches!(port.parse::<u16>(), Ok(p) if p > 0) {
                    Some(format!("its port {port:?} is not a number from 1 to 65535"))
                } else {
                    None
                }
            }
        }
    };
    match why {
        None => Ok(()),
        Some(why) => Err(refuse(field, s, "an endpoint", &why, ENDPOINT_RULE)),
    }
}

/// The name a peer daemon's certificate must carry: an IP address or a DNS name.
pub fn peer_name(field: &str, s: &str) -> Result<(), String> {
    let why = if s.is_empty() {
        Some("it is empty".to_string())
    } else if rustls_pki_types::ServerName::try_from(s).is_err() {
        Some("it is neither an IP address nor a DNS name".into())
    } else {
        None
    };
    match why {
        None => Ok(()),
        Some(why) => Err(refuse(
            field,
            s,
            "a peer name",
            &why,
            "the IP address or DNS name the source daemon's certificate carries",
        )),
    }
}

/// Whether `path` lies strictly inside `root`, compared component by component without
/// touching the file system: `path` starts with every component of `root`, and what
/// follows is at least one plain name, with no `..`, no root or prefix (an absolute
/// part joined later). `.` components are ignored on both sides.
///
/// Symbolic links are not resolved; callers that create or remove check those
/// themselves.
pub fn inside(root: &Path, path: &Path) -> bool {
    fn plain(p: &Path) -> Vec<Component<'_>> {
        p.components()
            .filter(|c| !matches!(c, Component::CurDir))
            .collect()
    }
    let (root, path) = (plain(root), plain(path));
    if root.is_empty() || path.len() <= root.len() || path[..root.len()] != root[..] {
        return false;
    }
    path[root.len()..]
        .iter()
        .all(|c| matches!(c, Component::Normal(_)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    const UUID: &str = "0b7c5a8e-1f0e-4c2a-9d8e-2f3a4b5c6d7e";

    #[test]
    fn labels() {
        for ok in [
            "a",
            "default",
            "kube-system",
            "a1",
            "0",
            "x-0-y",
            UUID,
            &"a".repeat(63),
        ] {
            assert_eq!(dns1123_label("f", ok), Ok(()), "{ok:?}");
            assert_eq!(namespace("f", ok), Ok(()), "{ok:?}");
            assert_eq!(container_name("f", ok), Ok(()), "{ok:?}");
        }
        for bad in [
            "",
            "../x",
            "..",
            ".",
            "a/b",
            "/etc",
            "Default",
            "-a",
            "a-",
            "a.b",
            "a_b",
            "a b",
            "a\0",
            "a\n",
            "名前",
            "caf\u{e9}",
            &"a".repeat(64),
        ] {
            assert!(dns1123_label("f", bad).is_err(), "{bad:?}");
            assert!(namespace("f", bad).is_err(), "{bad:?}");
            assert!(container_name("f", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn subdomains() {
        let long_label = "a".repeat(100);
        let max = format!("{}.{}", "a".repeat(126), "b".repeat(126));
        for ok in ["a", "vm-1", "web.v2", "a.b.c", "x-0.y-1", &long_label, &max] {
            assert_eq!(dns1123_subdomain("f", ok), Ok(()), "{ok:?}");
            assert_eq!(pod_name("f", ok), Ok(()), "{ok:?}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../etc",
            "a/b",
            ".a",
            "a.",
            "a..b",
            "-a.b",
            "a.-b",
            "a-.b",
            "Web",
            "a_b",
            "pod\u{301}",
            "ünï",
            &format!("{max}c"),
        ] {
            assert!(dns1123_subdomain("f", bad).is_err(), "{bad:?}");
            assert!(pod_name("f", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn uids() {
        assert_eq!(pod_uid("f", UUID), Ok(()));
        assert_eq!(pod_uid("f", "00000000-0000-0000-0000-000000000000"), Ok(()));
        for bad in [
            "",
            "u1",
            "../../etc",
            "0B7C5A8E-1F0E-4C2A-9D8E-2F3A4B5C6D7E",
            "0b7c5a8e1f0e4c2a9d8e2f3a4b5c6d7e",
            "0b7c5a8e-1f0e-4c2a-9d8e-2f3a4b5c6d7",
            "0b7c5a8e-1f0e-4c2a-9d8e-2f3a4b5c6d7e0",
            "0b7c5a8e-1f0e-4c2a-9d8e-2f3a4b5c6d7g",
            "0b7c5a8e-1f0e-4c2a-9d8e-2f3a4b5c6d/e",
            "0b7c5a8e-1f0e-4c2a-9d8e-2f3a4b5c6d\u{e9}",
            "0b7c5a8e-1f0e-4c2a-9d8e-2f3a4b5c6d..",
            "-b7c5a8e-1f0e-4c2a-9d8e-2f3a4b5c6d7e",
        ] {
            assert!(pod_uid("f", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn migration_ids() {
        // What the controller sends, and the readable ids of tests and tools.
        for ok in [UUID, "m", "vm-live-1", "bench-64-0", "bad-1"] {
            assert_eq!(migration_id("migration_id", ok), Ok(()), "{ok:?}");
        }
        for bad in [
            "",
            "../x",
            "a/b",
            "a.ram",
            "M1",
            "-rf",
            "a b",
            "ü",
            &"a".repeat(64),
        ] {
            assert!(migration_id("migration_id", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn container_ids_images_endpoints() {
        for ok in ["abc", &"f".repeat(64), "a.b_c-d", "Ctr1"] {
            assert_eq!(container_id("f", ok), Ok(()), "{ok:?}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "a..b",
            "a/b",
            "../x",
            "a b",
            &"a".repeat(77),
        ] {
            assert!(container_id("f", bad).is_err(), "{bad:?}");
        }
        for ok in [
            "busybox",
            "busybox:1.36",
            "docker.io/library/busybox@sha256:0123abcd",
            "sha256:0123abcd",
            "localhost:5000/My_App:V1.2-rc",
            "docker-pullable://busybox@sha256:01",
        ] {
            assert_eq!(image_ref("f", ok), Ok(()), "{ok:?}");
        }
        for bad in ["", "--config=/etc/x", "-x", "a b", "a;b", "a\nb", "é"] {
            assert!(image_ref("f", bad).is_err(), "{bad:?}");
        }
        for ok in [
            "10.0.0.2:5000",
            "node-1.example:7443",
            "[fd00::1]:5000",
            "[::1]:1",
        ] {
            assert_eq!(endpoint("f", ok), Ok(()), "{ok:?}");
        }
        for bad in [
            "",
            "10.0.0.2",
            ":5000",
            "h:0",
            "h:65536",
            "h:x",
            "-h:1",
            "h/../x:1",
            "h :1",
            "[fd00::1:1",
            "[]:1",
        ] {
            assert!(endpoint("f", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn messages_name_the_field_the_value_and_the_rule() {
        let e = namespace("target.namespace", "../etc").unwrap_err();
        assert!(e.starts_with("target.namespace \"../etc\" "), "{e}");
        assert!(e.contains("'.'"), "{e}");
        assert!(e.contains("RFC 1123 label"), "{e}");
        let e = pod_name("workload.pod_name", "Web").unwrap_err();
        assert!(
            e.contains("workload.pod_name") && e.contains("uppercase"),
            "{e}"
        );
        let e = pod_uid("target.pod_uid", "u1").unwrap_err();
        assert!(
            e.contains("target.pod_uid") && e.contains("8-4-4-4-12"),
            "{e}"
        );
        let e = migration_id("migration_id", "").unwrap_err();
        assert!(e.contains("migration_id") && e.contains("empty"), "{e}");
        let e = namespace("n", &"x".repeat(500)).unwrap_err();
        assert!(e.contains("500 characters") && e.len() < 600, "{e}");
        let e = container_name("c", "a/b").unwrap_err();
        assert!(e.contains("path separator"), "{e}");
    }

    #[test]
    fn paths_stay_inside_their_root() {
        let root = Path::new("/run/ferry/vms");
        assert!(inside(root, &root.join(UUID)));
        assert!(inside(root, &root.join(UUID).join("out.sock")));
        assert!(inside(root, Path::new("/run/ferry/vms/./x")));
        assert!(inside(Path::new("rel/root"), Path::new("rel/root/x")));
        for bad in [
            PathBuf::from("/run/ferry/vms"),
            PathBuf::from("/run/ferry/vms/"),
            PathBuf::from("/run/ferry/vms/.."),
            PathBuf::from("/run/ferry/vms/../vms2"),
            PathBuf::from("/run/ferry/vms/a/../../etc"),
            PathBuf::from("/run/ferry/vmsx/a"),
            PathBuf::from("/run/ferry"),
            PathBuf::from("/etc/passwd"),
            // What joining an absolute part gives.
            #[allow(clippy::join_absolute_paths)]
            root.join("/etc"),
            root.join("../etc"),
            PathBuf::from("run/ferry/vms/a"),
        ] {
            assert!(!inside(root, &bad), "{}", bad.display());
        }
        assert!(!inside(Path::new(""), Path::new("x")));
    }
}
