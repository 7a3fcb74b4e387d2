//! Stable-toolchain fuzzing of the frame decoder: valid frame sequences mutated at
//! random (bit flips, overwritten length fields, truncation, splices, random bytes),
//! fed through `frame::fuzz_decode` for a time budget: `FERRY_FUZZ_SECS` (default 3;
//! scripts/fuzz-transfer.sh runs longer). The seed is printed so a failure replays
//! with `FERRY_FUZZ_SEED`. The libFuzzer target in `transfer/fuzz` uses the same entry.
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use ferry_transfer::frame::{Codec, Frame, Mode, fuzz_decode};
use rand::{Rng, RngCore, SeedableRng, rngs::SmallRng};

fn valid_frames(rng: &mut SmallRng) -> BytesMut {
    let mut out = BytesMut::new();
    for _ in 0..rng.random_range(1..6) {
        let f = match rng.random_range(0..7) {
            0 => Frame::Hello {
                mode: if rng.random() {
                    Mode::Stream
                } else {
                    Mode::Pipe
                },
                id: format!("mig-{}/part", rng.random::<u16>()),
                token: format!("{:x}", rng.random::<u64>()),
            },
            1 => Frame::HelloAck {
                resume_offset: rng.random(),
            },
            2 => {
                let mut p = vec![0u8; rng.random_range(0..2048)];
                rng.fill_bytes(&mut p);
                Frame::Data {
                    offset: rng.random::<u32>() as u64,
                    raw_len: p.len() as u32,
                    crc32c: crc32c::crc32c(&p),
                    codec: Codec::None,
                    payload: Bytes::from(p),
                }
            }
            3 => Frame::Ack {
                offset: rng.random(),
            },
            4 => Frame::End {
                total: rng.random(),
                digest: rng.random(),
            },
            5 => Frame::Done {
                total: rng.random(),
            },
            _ => Frame::Error {
                retryable: rng.random(),
                offset: rng.random(),
                message: "crc mismatch".into(),
            },
        };
        f.encode(&mut out);
    }
    out
}

fn mutate(rng: &mut SmallRng, buf: &mut Vec<u8>) {
    for _ in 0..rng.random_range(0..4) {
        if buf.is_empty() {
            break;
        }
        let i = rng.random_range(0..buf.len());
        match rng.random_range(0..6) {
            0 => buf[i] ^= 1 << rng.random_range(0..8),
            1 => buf[i] = rng.random(),
            2 => buf.truncate(i),
            3 => {
                // Overwrite 4 bytes with an interesting length.
                let v: u32 = *[0, 1, 8, 40, 0x80_0040, 0x80_0041, u32::MAX, rng.random()]
                    .get(rng.random_range(0..8))
                    .unwrap();
                for (k, b) in v.to_be_bytes().iter().enumerate() {
                    if let Some(x) = buf.get_mut(i + k) {
                        *x = *b;
                    }
                }
            }
            4 => {
                let mut extra = vec![0u8; rng.random_range(1..64)];
                rng.fill_bytes(&mut extra);
                let at = rng.random_range(0..=buf.len());
                buf.splice(at..at, extra);
            }
            _ => {
                let j = rng.random_range(i..buf.len());
                buf.drain(i..j);
            }
        }
    }
}

#[test]
fn frame_decoder_survives_mutated_input() {
    let secs: u64 = std::env::var("FERRY_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let seed: u64 = std::env::var("FERRY_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("fuzzing the frame decoder for {secs}s, FERRY_FUZZ_SEED={seed}");
    let mut rng = SmallRng::seed_from_u64(seed);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut cases = 0u64;
    while Instant::now() < deadline {
        for _ in 0..256 {
            let mut input = vec![rng.random::<u8>()];
            if rng.random_range(0..8) == 0 {
                // Pure noise now and then.
                let mut noise = vec![0u8; rng.random_range(0..256)];
                rng.fill_bytes(&mut noise);
                input.extend(noise);
            } else {
                input.extend_from_slice(&valid_frames(&mut rng));
                mutate(&mut rng, &mut input);
            }
            fuzz_decode(&input);
            cases += 1;
        }
    }
    eprintln!("{cases} inputs decoded without a broken invariant");
    assert!(cases > 0);
}
