//! The daemon's typed errors. Their mapping to gRPC status codes lives in one place:
//! `convert::status_of`.
use std::process::ExitStatus;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The pod, container or migration does not exist here.
    #[error("not found: {0}")]
    NotFound(String),
    /// The request itself is malformed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The request is valid but the workload is in the wrong state (stopped, not a runc
    /// container, already migrating).
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// The strategy cannot run on this node (kernel or tool support missing).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// An external program failed; keeps its exit status, stderr and CRIU log excerpt.
    #[error("{program} {args} failed ({status}): {stderr}{}", log_suffix(.log_excerpt))]
    Command {
        program: String,
        args: String,
        status: String,
        stderr: String,
        log_excerpt: String,
    },
    /// Moving bytes between daemons failed.
    #[error("transfer: {0}")]
    Transfer(String),
    #[error("aborted: {0}")]
    Aborted(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

fn log_suffix(log: &str) -> String {
    if log.is_empty() {
        String::new()
    } else {
        format!("\n--- criu log excerpt ---\n{log}")
    }
}

impl RuntimeError {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> RuntimeError {
        let context = context.into();
        move |source| RuntimeError::Io { context, source }
    }

    pub fn command(
        program: &str,
        args: &[String],
        status: Option<ExitStatus>,
        stderr: &[u8],
        log_excerpt: String,
    ) -> RuntimeError {
        let stderr = String::from_utf8_lossy(stderr);
        // Keep the end: the reason is usually on the last lines.
        let lines: Vec<&str> = stderr.trim().lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
        RuntimeError::Command {
            program: program.to_string(),
            args: args.join(" "),
            status: status
                .map(|s| s.to_string())
                .unwrap_or_else(|| "not started".into()),
            stderr: tail,
            log_excerpt,
        }
    }
}
