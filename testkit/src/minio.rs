//! A real MinIO server for tests and benchmarks: built by `scripts/build-minio.sh`,
//! started on a free loopback port with its data in a temp dir, stoppable and
//! restartable on the same port and data (for "object store went away" tests).
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::process::ChildGuard;

pub const ACCESS_KEY: &str = "ferry-test";
pub const SECRET_KEY: &str = "ferry-test-secret";

pub struct MinioServer {
    bin: PathBuf,
    dir: tempfile::TempDir,
    addr: SocketAddr,
    guard: Option<ChildGuard>,
}

impl MinioServer {
    /// The MinIO binary: `$FERRY_MINIO`, else the cache path of the version pinned in
    /// `scripts/build-minio.sh`.
    pub fn binary() -> Result<PathBuf> {
        if let Ok(p) = std::env::var("FERRY_MINIO") {
            return Ok(PathBuf::from(p));
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-minio.sh");
        let text = std::fs::read_to_string(&script)
            .with_context(|| format!("reading {}", script.display()))?;
        let version = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("MINIO_VERSION=\"${MINIO_VERSION:-"))
            .and_then(|rest| rest.strip_suffix("}\""))
            .context("no MINIO_VERSION pin found in scripts/build-minio.sh")?;
        let cache = std::env::var("FERRY_CACHE").unwrap_or_else(|_| "/var/cache/ferry".into());
        let bin = PathBuf::from(cache)
            .join("minio")
            .join(version)
            .join("minio");
        if !bin.is_file() {
            bail!(
                "MinIO binary {} is missing: run scripts/build-minio.sh (or set FERRY_MINIO)",
                bin.display()
            );
        }
        Ok(bin)
    }

    /// Starts MinIO on a free loopback port and waits until it is live.
    pub fn start() -> Result<MinioServer> {
        Self::start_on(std::net::Ipv4Addr::LOCALHOST)
    }

    /// Starts MinIO on a free port of `ip` (e.g. a test LAN's host address, which the
    /// nodes' network namespaces reach) and waits until it is live.
    pub fn start_on(ip: std::net::Ipv4Addr) -> Result<MinioServer> {
        let bin = Self::binary()?;
        let dir = tempfile::Builder::new().prefix("ferry-minio-").tempdir()?;
        let addr = TcpListener::bind((ip, 0))?.local_addr()?;
        let mut m = MinioServer {
            bin,
            dir,
            addr,
            guard: None,
        };
        m.spawn()?;
        Ok(m)
    }

    fn spawn(&mut self) -> Result<()> {
        let data = self.dir.path().join("data");
        std::fs::create_dir_all(&data)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let console = crate::free_port()?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("server")
            .arg(&data)
            .arg("--address")
            .arg(self.addr.to_string())
            .arg("--console-address")
            .arg(console.to_string())
            .arg("--quiet")
            .env("MINIO_ROOT_USER", ACCESS_KEY)
            .env("MINIO_ROOT_PASSWORD", SECRET_KEY)
            .env("MINIO_UPDATE", "off")
            .env("MINIO_BROWSER", "off")
            .env("HOME", self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.guard = Some(ChildGuard::spawn("minio", cmd)?);
        self.wait_live(Duration::from_secs(60))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("minio.log")
    }

    /// The tail of MinIO's log, for error messages.
    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let start = s.len().saturating_sub(2000);
        s[s.floor_char_boundary(start)..].to_string()
    }

    fn wait_live(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.guard.as_mut().is_some_and(|g| g.exited()) {
                bail!("MinIO exited during startup; log:\n{}", self.log_tail());
            }
            // live = process up; ready = it also serves S3 requests (not just 503s).
            if http_status(self.addr, "/minio/health/live").ok() == Some(200)
                && http_status(self.addr, "/minio/health/ready").ok() == Some(200)
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "MinIO not live after {timeout:?}; log:\n{}",
            self.log_tail()
        )
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// SIGTERM (then SIGKILL after 5 s). Data stays for [`MinioServer::restart`].
    pub fn stop(&mut self) {
        if let Some(mut g) = self.guard.take() {
            g.stop(Duration::from_secs(5));
        }
    }

    /// SIGKILL at once, like a crash.
    pub fn kill(&mut self) {
        if let Some(mut g) = self.guard.take() {
            g.kill();
        }
    }

    /// Starts again on the same port and data directory.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn()
    }

    /// A rust-s3 handle on `bucket` (path style, the test credentials).
    pub fn bucket(&self, bucket: &str) -> Result<Box<s3::Bucket>> {
        let creds =
            s3::creds::Credentials::new(Some(ACCESS_KEY), Some(SECRET_KEY), None, None, None)?;
        let region = s3::Region::Custom {
            region: "us-east-1".into(),
            endpoint: self.endpoint(),
        };
        Ok(s3::Bucket::new(bucket, region, creds)?.with_path_style())
    }

    /// Creates `bucket` (no error if it exists).
    pub async fn create_bucket(&self, bucket: &str) -> Result<()> {
        let creds =
            s3::creds::Credentials::new(Some(ACCESS_KEY), Some(SECRET_KEY), None, None, None)?;
        let region = s3::Region::Custom {
            region: "us-east-1".into(),
            endpoint: self.endpoint(),
        };
        let mut attempts = 0;
        let r = loop {
            let r = s3::Bucket::create_with_path_style(
                bucket,
                region.clone(),
                creds.clone(),
                s3::BucketConfiguration::default(),
            )
            .await
            .with_context(|| format!("creating bucket {bucket}"))?;
            // 503 while MinIO finishes initializing its drive.
            attempts += 1;
            if r.response_code != 503 || attempts >= 50 {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        // 409: already owned by us.
        if !r.success() && r.response_code != 409 {
            bail!(
                "creating bucket {bucket}: HTTP {} {}",
                r.response_code,
                r.response_text
            );
        }
        Ok(())
    }
}

/// Objects in `bucket` whose key starts with `prefix` (path style, test credentials).
pub async fn keys_under(m: &MinioServer, bucket: &str, prefix: &str) -> Result<Vec<String>> {
    let pages = m.bucket(bucket)?.list(prefix.to_string(), None).await?;
    Ok(pages
        .into_iter()
        .flat_map(|p| p.contents)
        .map(|o| o.key)
        .collect())
}

/// The bytes of object `key` as the bucket holds them.
pub async fn object(m: &MinioServer, bucket: &str, key: &str) -> Result<Vec<u8>> {
    let r = m.bucket(bucket)?.get_object(key).await?;
    anyhow::ensure!(
        r.status_code() == 200,
        "GET {key}: HTTP {}",
        r.status_code()
    );
    Ok(r.to_vec())
}

/// Minimal HTTP/1.0 GET returning the status code (no HTTP client dependency needed).
fn http_status(addr: SocketAddr, path: &str) -> Result<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut head = [0u8; 32];
    let n = s.read(&mut head)?;
    let line = String::from_utf8_lossy(&head[..n]);
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("bad HTTP response")
}
