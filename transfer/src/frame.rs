//! Wire framing of the direct protocol. Public so the fuzz test can drive the decoder
//! with arbitrary bytes; the decoder must never panic, never allocate more than
//! [`MAX_FRAME`] for one frame, and reject anything malformed with a [`FrameError`].
//!
//! Every frame is `type: u8, len: u32 BE, body: [u8; len]`; integers are big endian.
//! This file uses only `bytes`, `thiserror` and `tokio-util`: the fuzz target
//! (`transfer/fuzz`) compiles it on its own.
//!
//! | type | frame     | body |
//! |------|-----------|------|
//! | 1    | Hello     | version u8, mode u8, flags u8, id_len u16, id (UTF-8), token_len u8, token |
//! | 2    | HelloAck  | resume_offset u64 |
//! | 3    | Data      | offset u64, raw_len u32, crc32c u32, codec u8, payload |
//! | 4    | Ack       | offset u64 (every byte below it is delivered) |
//! | 5    | End       | total u64, xxh3-128 [16] (digest of the whole stream) |
//! | 6    | Done      | total u64 (digest verified) |
//! | 7    | Error     | retryable u8, offset u64, message (UTF-8) |
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// 4: Hello carries the migration's token (see `Receiver::grant`).
/// 3: the whole-stream digest in End is XXH3-128. Version 1 used sha256 and 2 BLAKE3;
/// both cost more CPU per byte than AES-GCM itself on a 2-core node (BLAKE3 with AVX2:
/// 0.35 s/GiB per side, XXH3: 0.05-0.07) and capped throughput. The digest checks
/// ferry's own reassembly (resume, re-sends, queueing) end to end; tampering on the wire
/// is TLS's job (every record is AEAD-authenticated), so it need not be cryptographic.
pub const PROTOCOL_VERSION: u8 = 4;
/// Length of the whole-stream digest.
pub const DIGEST_LEN: usize = 16;
/// The whole-stream digest carried in End.
pub type Digest = [u8; DIGEST_LEN];

/// Largest chunk payload a sender may put in one Data frame.
pub const MAX_CHUNK: usize = 8 << 20;
/// Largest frame body the decoder accepts (a chunk plus its header).
pub const MAX_FRAME: usize = MAX_CHUNK + 64;
/// Longest stream id.
pub const MAX_ID: usize = 512;
/// Longest token in a Hello.
pub const MAX_TOKEN: usize = 128;
/// Longest Error message, in bytes: longer ones are cut when sent, refused when read
/// (so that every frame the decoder accepts re-encodes to itself).
pub const MAX_MESSAGE: usize = 4096;
const HEADER: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Chunked, acknowledged, verified stream.
    Stream,
    /// Raw bidirectional byte pipe after the handshake.
    Pipe,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    None,
    Zstd,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello {
        mode: Mode,
        id: String,
        /// The secret the receiver granted the migration (`Receiver::grant`); may be empty
        /// on the wire, and is then refused.
        token: String,
    },
    HelloAck {
        resume_offset: u64,
    },
    Data {
        offset: u64,
        raw_len: u32,
        crc32c: u32,
        codec: Codec,
        payload: Bytes,
    },
    Ack {
        offset: u64,
    },
    End {
        total: u64,
        /// BLAKE3 of the whole (uncompressed) stream.
        digest: Digest,
    },
    Done {
        total: u64,
    },
    Error {
        retryable: bool,
        offset: u64,
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME}")]
    TooLarge(usize),
    #[error("{frame} frame body is malformed: {why}")]
    Malformed {
        frame: &'static str,
        why: &'static str,
    },
    #[error("protocol version {0} is not supported (this build speaks {PROTOCOL_VERSION})")]
    Version(u8),
}

fn malformed(frame: &'static str, why: &'static str) -> FrameError {
    FrameError::Malformed { frame, why }
}

impl Frame {
    /// Appends the encoded frame to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        let start = out.len();
        out.put_u8(0);
        out.put_u32(0);
        let ty = match self {
            Frame::Hello { mode, id, token } => {
                out.put_u8(PROTOCOL_VERSION);
                out.put_u8(match mode {
                    Mode::Stream => 0,
                    Mode::Pipe => 1,
                });
                out.put_u8(0);
                out.put_u16(id.len() as u16);
                out.put_slice(id.as_bytes());
                out.put_u8(token.len() as u8);
                out.put_slice(token.as_bytes());
                1
            }
            Frame::HelloAck { resume_offset } => {
                out.put_u64(*resume_offset);
                2
            }
            Frame::Data {
                offset,
                raw_len,
                crc32c,
                codec,
                payload,
            } => {
                out.put_u64(*offset);
                out.put_u32(*raw_len);
                out.put_u32(*crc32c);
                out.put_u8(match codec {
                    Codec::None => 0,
                    Codec::Zstd => 1,
                });
                out.put_slice(payload);
                3
            }
            Frame::Ack { offset } => {
                out.put_u64(*offset);
                4
            }
            Frame::End { total, digest } => {
                out.put_u64(*total);
                out.put_slice(digest);
                5
            }
            Frame::Done { total } => {
                out.put_u64(*total);
                6
            }
            Frame::Error {
                retryable,
                offset,
                message,
            } => {
                out.put_u8(*retryable as u8);
                out.put_u64(*offset);
                // Messages are diagnostics: cut (at a character boundary) rather than
                // fail on huge ones.
                let mut cut = message.len().min(MAX_MESSAGE);
                while !message.is_char_boundary(cut) {
                    cut -= 1;
                }
                out.put_slice(&message.as_bytes()[..cut]);
                7
            }
        };
        let len = (out.len() - start - HEADER) as u32;
        out[start] = ty;
        out[start + 1..start + HEADER].copy_from_slice(&len.to_be_bytes());
    }

    /// Decodes one frame from the front of `buf`, consuming it. `Ok(None)` means more
    /// bytes are needed; the header is checked first so a huge declared length fails
    /// before anything is buffered.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if buf.len() < HEADER {
            return Ok(None);
        }
        let ty = buf[0];
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if !(1..=7).contains(&ty) {
            return Err(FrameError::UnknownType(ty));
        }
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge(len));
        }
        if buf.len() < HEADER + len {
            buf.reserve(HEADER + len - buf.len());
            return Ok(None);
        }
        buf.advance(HEADER);
        let mut body = buf.split_to(len).freeze();
        let frame = match ty {
            1 => {
                need(&body, 5, "Hello")?;
                let version = body.get_u8();
                if version != PROTOCOL_VERSION {
                    return Err(FrameError::Version(version));
                }
                let mode = match body.get_u8() {
                    0 => Mode::Stream,
                    1 => Mode::Pipe,
                    _ => return Err(malformed("Hello", "unknown mode")),
                };
                let _flags = body.get_u8();
                let id_len = body.get_u16() as usize;
                if id_len + 1 > body.len() {
                    return Err(malformed("Hello", "id length exceeds the body"));
                }
                let id = String::from_utf8(body.split_to(id_len).to_vec())
                    .map_err(|_| malformed("Hello", "id is not UTF-8"))?;
                check_id(&id).map_err(|why| malformed("Hello", why))?;
                let token_len = body.get_u8() as usize;
                if token_len != body.len() || token_len > MAX_TOKEN {
                    return Err(malformed("Hello", "token length does not match the body"));
                }
                let token = String::from_utf8(body.to_vec())
                    .map_err(|_| malformed("Hello", "token is not UTF-8"))?;
                Frame::Hello { mode, id, token }
            }
            2 => {
                exact(&body, 8, "HelloAck")?;
                Frame::HelloAck {
                    resume_offset: body.get_u64(),
                }
            }
            3 => {
                need(&body, 17, "Data")?;
                let offset = body.get_u64();
                let raw_len = body.get_u32();
                let crc32c = body.get_u32();
                let codec = match body.get_u8() {
                    0 => Codec::None,
                    1 => Codec::Zstd,
                    _ => return Err(malformed("Data", "unknown codec")),
                };
                if raw_len as usize > MAX_CHUNK {
                    return Err(malformed("Data", "raw length exceeds the chunk limit"));
                }
                if codec == Codec::None && raw_len as usize != body.len() {
                    return Err(malformed("Data", "raw length does not match the payload"));
                }
                if offset.checked_add(raw_len as u64).is_none() {
                    return Err(malformed("Data", "offset overflows"));
                }
                Frame::Data {
                    offset,
                    raw_len,
                    crc32c,
                    codec,
                    payload: body,
                }
            }
            4 => {
                exact(&body, 8, "Ack")?;
                Frame::Ack {
                    offset: body.get_u64(),
                }
            }
            5 => {
                exact(&body, 8 + DIGEST_LEN, "End")?;
                let total = body.get_u64();
                let mut digest = [0u8; DIGEST_LEN];
                body.copy_to_slice(&mut digest);
                Frame::End { total, digest }
            }
            6 => {
                exact(&body, 8, "Done")?;
                Frame::Done {
                    total: body.get_u64(),
                }
            }
            7 => {
                need(&body, 9, "Error")?;
                let retryable = body.get_u8() != 0;
                let offset = body.get_u64();
                // Bounded as decoded: invalid UTF-8 grows into U+FFFD (3 bytes each).
                let message = String::from_utf8_lossy(&body).into_owned();
                if message.len() > MAX_MESSAGE {
                    return Err(malformed("Error", "message too long"));
                }
                Frame::Error {
                    retryable,
                    offset,
                    message,
                }
            }
            _ => unreachable!("type checked above"),
        };
        Ok(Some(frame))
    }
}

fn need(body: &Bytes, n: usize, frame: &'static str) -> Result<(), FrameError> {
    if body.len() < n {
        Err(malformed(frame, "body too short"))
    } else {
        Ok(())
    }
}

fn exact(body: &Bytes, n: usize, frame: &'static str) -> Result<(), FrameError> {
    if body.len() != n {
        Err(malformed(frame, "wrong body length"))
    } else {
        Ok(())
    }
}

/// Stream ids are `<migration-id>/<name>`-like: printable, bounded, no control bytes.
pub fn check_id(id: &str) -> Result<(), &'static str> {
    if id.is_empty() {
        return Err("empty id");
    }
    if id.len() > MAX_ID {
        return Err("id too long");
    }
    if id.chars().any(|c| c.is_control()) {
        return Err("id contains control characters");
    }
    Ok(())
}

/// `tokio_util` codec over [`Frame::encode`] / [`Frame::decode`].
#[derive(Debug, Default)]
pub struct FrameCodec;

impl tokio_util::codec::Decoder for FrameCodec {
    type Item = Frame;
    type Error = std::io::Error;
    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, std::io::Error> {
        Frame::decode(src).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }
}

impl tokio_util::codec::Encoder<Frame> for FrameCodec {
    type Error = std::io::Error;
    fn encode(&mut self, item: Frame, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        item.encode(dst);
        Ok(())
    }
}

/// Fuzzing entry point shared by the cargo-fuzz target (`transfer/fuzz`) and the
/// stable time-boxed test (`tests/fuzz_frames.rs`): feeds `data` to the decoder in
/// pieces whose sizes come from the first byte, as a socket would, and panics if an
/// invariant breaks (a decoded frame must re-encode to the bytes it came from, a
/// rejected header must not have been buffered, memory stays bounded).
#[doc(hidden)]
pub fn fuzz_decode(data: &[u8]) {
    let Some((&step, data)) = data.split_first() else {
        return;
    };
    let step = (step as usize % 64) + 1;
    let mut buf = BytesMut::new();
    let mut consumed = 0usize;
    for piece in data.chunks(step) {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.clone();
            match Frame::decode(&mut buf) {
                Ok(Some(frame)) => {
                    let used = before.len() - buf.len();
                    let mut again = BytesMut::new();
                    frame.encode(&mut again);
                    // Hello flags and Error message cuts are the only non-canonical parts.
                    let canonical = !matches!(frame, Frame::Hello { .. } | Frame::Error { .. });
                    if canonical {
                        assert_eq!(
                            &again[..],
                            &before[..used],
                            "re-encoding differs for {frame:?}"
                        );
                    }
                    assert_eq!(Frame::decode(&mut again).unwrap(), Some(frame));
                    consumed += used;
                }
                Ok(None) => {
                    assert_eq!(buf, before, "need-more must not consume");
                    assert!(
                        buf.capacity() <= 2 * (MAX_FRAME + HEADER) + buf.len(),
                        "unbounded buffer"
                    );
                    break;
                }
                Err(_) => return, // a real connection is closed here
            }
        }
    }
    assert!(consumed <= data.len());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(f: Frame) {
        let mut b = BytesMut::new();
        f.encode(&mut b);
        // Byte by byte: a partial frame is "need more", never an error.
        let mut partial = BytesMut::new();
        for (i, byte) in b.iter().enumerate() {
            if i + 1 < b.len() {
                partial.put_u8(*byte);
                assert_eq!(Frame::decode(&mut partial).unwrap(), None);
            }
        }
        assert_eq!(Frame::decode(&mut b).unwrap(), Some(f));
        assert!(b.is_empty());
    }

    #[test]
    fn frames_roundtrip() {
        roundtrip(Frame::Hello {
            mode: Mode::Pipe,
            id: "m-1/qemu".into(),
            token: "0123abcd".into(),
        });
        roundtrip(Frame::Hello {
            mode: Mode::Stream,
            id: "m-1/bundle/app".into(),
            token: String::new(),
        });
        roundtrip(Frame::HelloAck {
            resume_offset: 1 << 40,
        });
        roundtrip(Frame::Data {
            offset: 7,
            raw_len: 3,
            crc32c: crc32c::crc32c(b"abc"),
            codec: Codec::None,
            payload: Bytes::from_static(b"abc"),
        });
        roundtrip(Frame::Ack { offset: 99 });
        roundtrip(Frame::End {
            total: 5,
            digest: [7; DIGEST_LEN],
        });
        roundtrip(Frame::Done { total: 5 });
        roundtrip(Frame::Error {
            retryable: true,
            offset: 3,
            message: "crc".into(),
        });
    }

    #[test]
    fn error_messages_are_cut_when_sent_and_bounded_when_read() {
        let mut b = BytesMut::new();
        Frame::Error {
            retryable: false,
            offset: 0,
            message: "é".repeat(MAX_MESSAGE),
        }
        .encode(&mut b);
        match Frame::decode(&mut b).unwrap() {
            Some(Frame::Error { message, .. }) => {
                assert!(message.len() <= MAX_MESSAGE && message.chars().all(|c| c == 'é'))
            }
            other => panic!("{other:?}"),
        }
        let mut b = BytesMut::new();
        b.put_u8(7);
        b.put_u32((9 + MAX_MESSAGE + 1) as u32);
        b.put_bytes(0, 9);
        b.put_bytes(b'x', MAX_MESSAGE + 1);
        assert!(matches!(
            Frame::decode(&mut b),
            Err(FrameError::Malformed { .. })
        ));
        // Short on the wire, too long once invalid bytes became U+FFFD.
        let mut b = BytesMut::new();
        b.put_u8(7);
        b.put_u32((9 + MAX_MESSAGE / 2) as u32);
        b.put_bytes(0, 9);
        b.put_bytes(0xff, MAX_MESSAGE / 2);
        assert!(matches!(
            Frame::decode(&mut b),
            Err(FrameError::Malformed { .. })
        ));
    }

    #[test]
    fn oversized_length_is_rejected_before_buffering() {
        let mut b = BytesMut::from(&[3u8, 0xff, 0xff, 0xff, 0xff][..]);
        assert_eq!(
            Frame::decode(&mut b),
            Err(FrameError::TooLarge(u32::MAX as usize))
        );
    }

    #[test]
    fn data_with_wrong_raw_len_is_rejected() {
        let mut b = BytesMut::new();
        Frame::Data {
            offset: 0,
            raw_len: 4,
            crc32c: 0,
            codec: Codec::None,
            payload: Bytes::from_static(b"abc"),
        }
        .encode(&mut b);
        assert!(matches!(
            Frame::decode(&mut b),
            Err(FrameError::Malformed { .. })
        ));
    }
}
