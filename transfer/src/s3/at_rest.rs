//! Encryption at rest: every part of a stream is sealed with ChaCha20-Poly1305 before
//! it is uploaded, so the bucket (and whoever reads it) holds only ciphertext.
//!
//! The key of a stream is derived from a secret the sender and the receiver share and
//! the bucket never sees (ferry: the migration's token, which reaches the daemons over
//! the authenticated control channel), the stream id and a random salt drawn for each
//! upload: `HMAC-SHA256(secret, "ferry-s3-encrypt v1 <id> <salt>")`. A fresh salt per
//! upload means that re-sending a stream under the same id never reuses a (key, nonce)
//! pair; the nonce is the part number, and the part number is also the associated
//! data, so parts cannot be reordered without failing their tag.
use hmac::{Hmac, Mac};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::hex;

/// What encryption adds to each part: the Poly1305 tag.
pub(super) const TAG_LEN: usize = 16;

/// The manifest's record of how the parts were encrypted (never the key).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Encryption {
    /// `chacha20-poly1305` (the only one so far).
    pub cipher: String,
    /// Hex, 16 random bytes of this upload.
    pub salt: String,
}

impl Encryption {
    pub(super) fn fresh() -> Encryption {
        Encryption {
            cipher: CIPHER.into(),
            salt: hex(&rand::random::<[u8; 16]>()),
        }
    }
}

const CIPHER: &str = "chacha20-poly1305";

/// The key of one stream upload.
pub(super) struct PartKey(LessSafeKey);

impl PartKey {
    /// `None` when the manifest names a cipher this build does not know.
    pub fn derive(secret: &[u8], id: &str, enc: &Encryption) -> Option<PartKey> {
        if enc.cipher != CIPHER {
            return None;
        }
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
        mac.update(format!("ferry-s3-encrypt v1 {id} {}", enc.salt).as_bytes());
        let key = mac.finalize().into_bytes();
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, &key).expect("32-byte key");
        Some(PartKey(LessSafeKey::new(unbound)))
    }

    /// Encrypts part `number` in place, appending the tag.
    pub fn seal(&self, number: u32, part: &mut Vec<u8>) {
        self.0
            .seal_in_place_append_tag(nonce(number), aad(number), part)
            .expect("a part is far below ChaCha20's length limit");
    }

    /// Decrypts part `number` in place; `None` when its tag does not verify (another
    /// key, or bytes changed at rest).
    pub fn open(&self, number: u32, mut part: Vec<u8>) -> Option<Vec<u8>> {
        let len = self
            .0
            .open_in_place(nonce(number), aad(number), &mut part)
            .ok()?
            .len();
        part.truncate(len);
        Some(part)
    }
}

fn nonce(number: u32) -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    n[NONCE_LEN - 4..].copy_from_slice(&number.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

fn aad(number: u32) -> Aad<[u8; 4]> {
    Aad::from(number.to_be_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_part_opens_only_with_its_key_number_and_bytes() {
        let enc = Encryption::fresh();
        let key = PartKey::derive(b"token", "m/x", &enc).unwrap();
        let mut part = b"guest memory".to_vec();
        key.seal(3, &mut part);
        assert_eq!(part.len(), 12 + TAG_LEN);
        assert!(!part.windows(6).any(|w| w == b"memory"));
        assert_eq!(key.open(3, part.clone()).unwrap(), b"guest memory");
        // Another part number, stream id, salt or secret: refused.
        assert!(key.open(4, part.clone()).is_none());
        let other_id = PartKey::derive(b"token", "m/y", &enc).unwrap();
        assert!(other_id.open(3, part.clone()).is_none());
        let other_salt = PartKey::derive(b"token", "m/x", &Encryption::fresh()).unwrap();
        assert!(other_salt.open(3, part.clone()).is_none());
        let other_secret = PartKey::derive(b"tokem", "m/x", &enc).unwrap();
        assert!(other_secret.open(3, part.clone()).is_none());
        let mut flipped = part;
        flipped[0] ^= 1;
        assert!(key.open(3, flipped).is_none());
        let unknown = Encryption {
            cipher: "rot13".into(),
            ..enc
        };
        assert!(PartKey::derive(b"token", "m/x", &unknown).is_none());
    }
}
