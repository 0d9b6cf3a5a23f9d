//! Identity proofs for the connection handshake.
//!
//! A name in the [`Directory`](crate::Directory) belongs to one uid. When a
//! listener registers, the directory makes a random [`ListenerKey`] for it
//! and gives it to the listener alone. When `from` resolves `to`, the
//! directory checks that the caller's uid owns `from` and that `from` is on
//! `to`'s allowlist, and only then hands it the [`PairSecret`] of the pair:
//! `HMAC-SHA256(key of to, from)`. The listener can compute the same secret
//! from its key and the name a peer claims, so no per-connection round trip
//! to the directory is needed.
//!
//! At connect the listener sends a fresh random nonce; the peer answers with
//! `HMAC-SHA256(pair secret, nonce, transport, from, to)` in its hello. A
//! local process that merely claims an allowlisted name has no secret; one
//! that recorded an earlier handshake cannot replay it against a new nonce.
//! The proof authenticates the peer, it does not encrypt the stream: TCP
//! between hosts belongs on a network the operator trusts not to be
//! tampered with, or under TLS (not built yet).
//!
//! What this module must never do: print or log a key or a secret, or
//! compare a proof in time that depends on its content (`hmac`'s
//! `verify_slice` is constant-time).

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::types::Transport;
use crate::{IcError, Result};

/// Bytes in a key, a secret, a nonce and a proof.
pub const PROOF_LEN: usize = 32;

type HmacSha256 = Hmac<Sha256>;

/// The key of one registered endpoint, held by the directory and by the
/// listener that registered it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerKey(pub(crate) [u8; PROOF_LEN]);

/// What a peer needs to prove it is `from` to the listener `to`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairSecret(pub(crate) [u8; PROOF_LEN]);

/// A listener's challenge, fresh for every connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Nonce(pub [u8; PROOF_LEN]);

impl std::fmt::Debug for ListenerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ListenerKey(..)")
    }
}

impl std::fmt::Debug for PairSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PairSecret(..)")
    }
}

fn random() -> Result<[u8; PROOF_LEN]> {
    let mut b = [0u8; PROOF_LEN];
    getrandom::fill(&mut b).map_err(IcError::Random)?;
    Ok(b)
}

fn mac(key: &[u8; PROOF_LEN]) -> HmacSha256 {
    // HMAC pads a key shorter than the hash's block with zeros; padding it
    // here into the block-sized key type makes the constructor infallible
    // (the same MAC as HMAC with the 32-byte key).
    let mut block = hmac::digest::Key::<HmacSha256>::default();
    block[..PROOF_LEN].copy_from_slice(key);
    <HmacSha256 as hmac::digest::KeyInit>::new(&block)
}

/// Feeds `s` with its length first, so no two field lists share a
/// transcript.
fn field(m: &mut HmacSha256, s: &[u8]) {
    m.update(&(s.len() as u64).to_le_bytes());
    m.update(s);
}

impl ListenerKey {
    /// A new random key.
    pub(crate) fn generate() -> Result<Self> {
        random().map(ListenerKey)
    }

    /// The secret of the pair (`from`, this listener).
    pub fn pair_secret(&self, from: &str) -> PairSecret {
        let mut m = mac(&self.0);
        field(&mut m, b"partvisor-ic pair v1");
        field(&mut m, from.as_bytes());
        PairSecret(m.finalize().into_bytes().into())
    }

    /// Whether `proof` answers `nonce` for a peer claiming to be `from`.
    pub(crate) fn verify(
        &self,
        nonce: &Nonce,
        t: Transport,
        from: &str,
        to: &str,
        proof: &[u8; PROOF_LEN],
    ) -> bool {
        transcript(&self.pair_secret(from), nonce, t, from, to)
            .verify_slice(proof)
            .is_ok()
    }
}

impl PairSecret {
    /// The answer to `nonce` for the hello (`t`, `from`, `to`).
    pub(crate) fn prove(&self, nonce: &Nonce, t: Transport, from: &str, to: &str) -> [u8; 32] {
        transcript(self, nonce, t, from, to)
            .finalize()
            .into_bytes()
            .into()
    }
}

fn transcript(s: &PairSecret, nonce: &Nonce, t: Transport, from: &str, to: &str) -> HmacSha256 {
    let mut m = mac(&s.0);
    field(&mut m, b"partvisor-ic hello v1");
    field(&mut m, &nonce.0);
    field(&mut m, transport_name(t));
    field(&mut m, from.as_bytes());
    field(&mut m, to.as_bytes());
    m
}

fn transport_name(t: Transport) -> &'static [u8] {
    match t {
        Transport::Shm => b"shm",
        Transport::Tcp => b"tcp",
    }
}

impl Nonce {
    /// A fresh challenge.
    pub(crate) fn generate() -> Result<Self> {
        random().map(Nonce)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proof_verifies_only_for_its_nonce_names_transport_and_key() {
        let key = ListenerKey::generate().unwrap();
        let n = Nonce::generate().unwrap();
        let p = key
            .pair_secret("cli")
            .prove(&n, Transport::Tcp, "cli", "svc");
        assert!(key.verify(&n, Transport::Tcp, "cli", "svc", &p));
        let other_nonce = Nonce::generate().unwrap();
        assert!(!key.verify(&other_nonce, Transport::Tcp, "cli", "svc", &p));
        assert!(!key.verify(&n, Transport::Shm, "cli", "svc", &p));
        assert!(!key.verify(&n, Transport::Tcp, "clj", "svc", &p));
        assert!(!key.verify(&n, Transport::Tcp, "cli", "svd", &p));
        let other_key = ListenerKey::generate().unwrap();
        assert!(!other_key.verify(&n, Transport::Tcp, "cli", "svc", &p));
        // The secret of one name proves nothing for another.
        let wrong = key
            .pair_secret("app")
            .prove(&n, Transport::Tcp, "cli", "svc");
        assert!(!key.verify(&n, Transport::Tcp, "cli", "svc", &wrong));
    }

    #[test]
    fn keys_and_secrets_never_print() {
        let key = ListenerKey::generate().unwrap();
        assert_eq!(format!("{key:?}"), "ListenerKey(..)");
        assert_eq!(format!("{:?}", key.pair_secret("x")), "PairSecret(..)");
    }
}
