//! Errors that name the failing side and byte offset, so a migration's status can say
//! exactly where a transfer stopped.
use std::fmt;

use crate::s3::UploadCheckpoint;

/// Which end of a transfer failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Sender,
    Receiver,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Sender => "sender",
            Side::Receiver => "receiver",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// A direct stream or pipe failed. `offset` is the byte of the (uncompressed)
    /// stream at which it failed: for the sender the last acknowledged byte, for the
    /// receiver the next byte it expected.
    #[error("{side} of stream {stream:?} failed at byte {offset}: {reason}")]
    Stream {
        side: Side,
        stream: String,
        offset: u64,
        reason: String,
    },

    /// An S3 operation failed after its retries. `checkpoint` is set on upload
    /// failures whose completed prefix can be resumed with
    /// [`crate::S3Store::resume_stream`].
    #[error("S3 {op} of {key:?} failed at byte {offset} ({side}): {reason}")]
    S3 {
        side: Side,
        op: &'static str,
        key: String,
        offset: u64,
        reason: String,
        checkpoint: Option<Box<UploadCheckpoint>>,
    },

    /// Certificates or keys could not be loaded or do not fit together.
    #[error("TLS setup: {0}")]
    Tls(String),

    /// The receiver could not listen.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },

    /// Bad arguments (empty or too long stream id, zero chunk size, ...).
    #[error("invalid argument: {0}")]
    Invalid(String),
}

impl TransferError {
    pub(crate) fn stream(side: Side, stream: &str, offset: u64, reason: impl fmt::Display) -> Self {
        TransferError::Stream {
            side,
            stream: stream.to_string(),
            offset,
            reason: reason.to_string(),
        }
    }

    /// The byte offset at which the transfer failed, when one applies.
    pub fn offset(&self) -> Option<u64> {
        match self {
            TransferError::Stream { offset, .. } | TransferError::S3 { offset, .. } => {
                Some(*offset)
            }
            _ => None,
        }
    }

    /// The side that failed, when one applies.
    pub fn side(&self) -> Option<Side> {
        match self {
            TransferError::Stream { side, .. } | TransferError::S3 { side, .. } => Some(*side),
            _ => None,
        }
    }

    /// The resumable state of an interrupted S3 upload.
    pub fn checkpoint(&self) -> Option<&UploadCheckpoint> {
        match self {
            TransferError::S3 { checkpoint, .. } => checkpoint.as_deref(),
            _ => None,
        }
    }
}

impl From<TransferError> for std::io::Error {
    fn from(e: TransferError) -> Self {
        std::io::Error::other(e)
    }
}
