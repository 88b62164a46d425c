//! Accounts and device proof. Passwords are argon2id PHC strings; a password is used
//! only to enroll a device key. Every connection then proves the device by signing
//! `auth_transcript(nonce, exporter)`: the nonce is fresh per connection and the TLS
//! exporter value is unique to the session, so no bearer secret exists to steal.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use argon2::password_hash::{PasswordHasher, PasswordVerifier, phc::PasswordHash};
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use switchboard_protocol::limits::{MAX_NAME_BYTES, MAX_PASSWORD_BYTES};
use switchboard_protocol::{DeviceId, Enroll, ErrorBody, ErrorCode, UserId};
use switchboard_storage::{DeviceRecord, Store, StoreError};
use tokio::sync::Semaphore;

use crate::limits::{
    ARGON2_CONCURRENCY, AUTH_FAILURE_KEYS_MAX, AUTH_FAILURE_WINDOW_MS, AUTH_FAILURES_PER_ACCOUNT,
    AUTH_FAILURES_PER_ADDRESS, MAX_DEVICES_PER_USER, MIN_PASSWORD_BYTES,
};
use crate::reply::internal;

/// Authentication service shared by all connections.
pub struct Auth {
    store: Arc<Store>,
    argon: argon2::Argon2<'static>,
    /// Held by the blocking hash itself, so a cancelled login cannot leave more hashes
    /// running than there are slots.
    argon_slots: Arc<Semaphore>,
    failures: FailureLimiter,
    registration_open: bool,
}

fn fail(code: ErrorCode, msg: &str) -> ErrorBody {
    ErrorBody::new(code, msg)
}

impl Auth {
    /// An auth service over `store` with the given argon2id cost.
    pub fn new(store: Arc<Store>, memory_kib: u32, iterations: u32, registration_open: bool) -> anyhow::Result<Self> {
        let params =
            argon2::Params::new(memory_kib, iterations, 1, None).map_err(|e| anyhow::anyhow!("argon2 params: {e}"))?;
        Ok(Auth {
            store,
            argon: argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params),
            argon_slots: Arc::new(Semaphore::new(ARGON2_CONCURRENCY)),
            failures: FailureLimiter::default(),
            registration_open,
        })
    }

    /// Hashes a password (CPU-heavy: runs on the blocking pool, bounded).
    pub async fn hash_password(&self, password: &str) -> Result<String, ErrorBody> {
        let slot = self.argon_slots.clone().acquire_owned().await.map_err(internal)?;
        let argon = self.argon.clone();
        let password = password.to_owned();
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            argon.hash_password(password.as_bytes()).map(|h| h.to_string())
        })
        .await
        .map_err(internal)?
        .map_err(internal)
    }

    async fn verify_password(&self, password: &str, phc: &str) -> Result<bool, ErrorBody> {
        let slot = self.argon_slots.clone().acquire_owned().await.map_err(internal)?;
        let argon = self.argon.clone();
        let (password, phc) = (password.to_owned(), phc.to_owned());
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            let parsed = PasswordHash::new(&phc).map_err(internal)?;
            Ok(argon.verify_password(password.as_bytes(), &parsed).is_ok())
        })
        .await
        .map_err(internal)?
    }

    /// Creates an account and enrolls the device that signed `transcript`.
    pub async fn register(&self, req: &Enroll, transcript: &[u8]) -> Result<(UserId, DeviceId), ErrorBody> {
        if !self.registration_open {
            return Err(fail(ErrorCode::REGISTRATION_CLOSED, "registration is closed on this broker"));
        }
        check_user_name(&req.user)?;
        check_password(&req.password)?;
        // Everything that can be refused is checked before the account is created.
        let key = verify_enrollment(req, transcript)?;
        let hash = self.hash_password(&req.password).await?;
        let user = self.create_user(&req.user, hash).await?;
        let device = self.enroll(user, &req.device_name, key).await?;
        Ok((user, device))
    }

    /// Checks the password and enrolls the device that signed `transcript`.
    pub async fn login(&self, req: &Enroll, transcript: &[u8], from: IpAddr) -> Result<(UserId, DeviceId), ErrorBody> {
        let address = [LimitKey::Address(from)];
        if check_user_name(&req.user).is_err() || req.password.len() > MAX_PASSWORD_BYTES as usize {
            // Not a name that can exist: never a key in the table, which stays small.
            self.failures.check(&address)?;
            self.failures.record(&address);
            return Err(fail(ErrorCode::AUTH_FAILED, "wrong user name or password"));
        }
        let keys = [LimitKey::Account(req.user.clone()), LimitKey::Address(from)];
        self.failures.check(&keys)?;
        let key = verify_enrollment(req, transcript)?;
        // Counted before the (slow) check so concurrent guesses cannot all pass the
        // limit at once; refunded when the password is right.
        self.failures.record(&keys);
        let user = match self.store.user_by_name(&req.user).map_err(internal)? {
            Some((id, record)) if self.verify_password(&req.password, &record.password_hash).await? => id,
            _ => return Err(fail(ErrorCode::AUTH_FAILED, "wrong user name or password")),
        };
        self.failures.refund(&keys);
        let device = self.enroll(user, &req.device_name, key).await?;
        Ok((user, device))
    }

    /// Verifies an enrolled device's signature over `transcript`.
    pub fn authenticate(
        &self,
        user_name: &str,
        device: DeviceId,
        signature: &[u8],
        transcript: &[u8],
        from: IpAddr,
    ) -> Result<UserId, ErrorBody> {
        let keys = [LimitKey::Account(user_name.to_owned()), LimitKey::Address(from)];
        self.failures.check(&keys)?;
        let found = match self.store.user_by_name(user_name).map_err(internal)? {
            Some((user, _)) => self.store.device(user, device).map_err(internal)?.map(|d| (user, d)),
            None => None,
        };
        let verified = found.and_then(|(user, d)| {
            let key = VerifyingKey::from_bytes(&d.public_key).ok()?;
            let sig = Signature::from_slice(signature).ok()?;
            key.verify(transcript, &sig).ok().map(|_| user)
        });
        verified.ok_or_else(|| {
            self.failures.record(&keys);
            fail(ErrorCode::AUTH_FAILED, "unknown device or bad signature")
        })
    }

    /// Operator path: creates a user without a device (`switchboard user add`).
    pub async fn add_user(&self, name: &str, password: &str) -> Result<UserId, ErrorBody> {
        check_user_name(name)?;
        check_password(password)?;
        let hash = self.hash_password(password).await?;
        self.create_user(name, hash).await
    }

    /// Stores a new account; `CONFLICT` if the name is taken. Durable when it returns.
    async fn create_user(&self, name: &str, hash: String) -> Result<UserId, ErrorBody> {
        let name = name.to_owned();
        let created =
            crate::catalog::catalog_write(&self.store, move |s| s.create_user(&name, &hash, crate::now_ms())).await?;
        let (user, durable) = match created {
            Ok(v) => v,
            Err(StoreError::Conflict) => return Err(fail(ErrorCode::CONFLICT, "user name is taken")),
            Err(e) => return Err(internal(e)),
        };
        durable.await.map_err(internal)?;
        Ok(user)
    }

    /// Stores a device whose request `verify_enrollment` accepted.
    async fn enroll(&self, user: UserId, device_name: &str, key: [u8; 32]) -> Result<DeviceId, ErrorBody> {
        let record = DeviceRecord { name: device_name.to_owned(), public_key: key, enrolled_ms: crate::now_ms() };
        let added =
            crate::catalog::catalog_write(&self.store, move |s| s.add_device(user, &record, MAX_DEVICES_PER_USER))
                .await?;
        let (device, durable) = match added {
            Ok(v) => v,
            Err(StoreError::LimitReached) => {
                return Err(fail(ErrorCode::FORBIDDEN, "device limit reached; revoke a device first"));
            }
            Err(e) => return Err(internal(e)),
        };
        durable.await.map_err(internal)?;
        Ok(device)
    }
}

/// Checks everything about an enrollment request that needs no account: the device
/// name, the key and its signature over this connection's transcript.
fn verify_enrollment(req: &Enroll, transcript: &[u8]) -> Result<[u8; 32], ErrorBody> {
    check_label(&req.device_name)?;
    let key: [u8; 32] =
        req.public_key.as_ref().try_into().map_err(|_| fail(ErrorCode::INVALID, "public key must be 32 bytes"))?;
    let verifying =
        VerifyingKey::from_bytes(&key).map_err(|_| fail(ErrorCode::INVALID, "not an Ed25519 public key"))?;
    let sig =
        Signature::from_slice(&req.signature).map_err(|_| fail(ErrorCode::INVALID, "signature must be 64 bytes"))?;
    verifying.verify(transcript, &sig).map_err(|_| fail(ErrorCode::AUTH_FAILED, "device signature does not verify"))?;
    Ok(key)
}

/// User names: 1..=64 bytes of `[a-z0-9_.-]`, so they are unambiguous in any UI.
pub fn check_user_name(name: &str) -> Result<(), ErrorBody> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_BYTES as usize
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b));
    if ok { Ok(()) } else { Err(fail(ErrorCode::INVALID, "user names are 1-64 characters of a-z 0-9 _ . -")) }
}

fn check_password(password: &str) -> Result<(), ErrorBody> {
    if password.len() < MIN_PASSWORD_BYTES || password.len() > MAX_PASSWORD_BYTES as usize {
        return Err(fail(ErrorCode::INVALID, "passwords are 8-256 bytes"));
    }
    Ok(())
}

/// Device names and titles: 1..=64 bytes, no control characters.
pub fn check_label(label: &str) -> Result<(), ErrorBody> {
    if label.is_empty() || label.len() > MAX_NAME_BYTES as usize || label.chars().any(char::is_control) {
        return Err(fail(ErrorCode::INVALID, "names are 1-64 bytes without control characters"));
    }
    Ok(())
}

#[derive(Clone, PartialEq, Eq, Hash)]
enum LimitKey {
    Account(String),
    Address(IpAddr),
}

impl LimitKey {
    fn max_failures(&self) -> u32 {
        match self {
            LimitKey::Account(_) => AUTH_FAILURES_PER_ACCOUNT,
            LimitKey::Address(_) => AUTH_FAILURES_PER_ADDRESS,
        }
    }
}

/// Counts failed authentications per account and per address in fixed windows.
/// Successful logins cost nothing, so a storm of valid devices is never slowed. The
/// map is bounded: expired windows are dropped when it is full, and if it is still
/// full a new key is not tracked (and logged) rather than growing memory.
#[derive(Default)]
struct FailureLimiter {
    windows: Mutex<HashMap<LimitKey, (u64, u32)>>,
}

impl FailureLimiter {
    fn check(&self, keys: &[LimitKey]) -> Result<(), ErrorBody> {
        let now = crate::now_ms();
        let map = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        for key in keys {
            if let Some(&(start, count)) = map.get(key)
                && now.saturating_sub(start) < AUTH_FAILURE_WINDOW_MS
                && count >= key.max_failures()
            {
                return Err(fail(ErrorCode::RATE_LIMITED, "too many failed attempts; try again later"));
            }
        }
        Ok(())
    }

    /// Takes back one counted attempt per key (the attempt turned out to be right).
    fn refund(&self, keys: &[LimitKey]) {
        let mut map = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        for key in keys {
            if let Some(slot) = map.get_mut(key) {
                slot.1 = slot.1.saturating_sub(1);
            }
        }
    }

    fn record(&self, keys: &[LimitKey]) {
        let now = crate::now_ms();
        let mut map = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        for key in keys {
            if map.len() >= AUTH_FAILURE_KEYS_MAX && !map.contains_key(key) {
                map.retain(|_, (start, _)| now.saturating_sub(*start) < AUTH_FAILURE_WINDOW_MS);
                if map.len() >= AUTH_FAILURE_KEYS_MAX {
                    tracing::warn!("auth failure table full; not tracking a new key");
                    continue;
                }
            }
            let slot = map.entry(key.clone()).or_insert((now, 0));
            if now.saturating_sub(slot.0) >= AUTH_FAILURE_WINDOW_MS {
                *slot = (now, 0);
            }
            slot.1 += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names() {
        for ok in ["alice", "a", "bob_2", "x.y-z"] {
            assert!(check_user_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Alice", "a b", "é", &"a".repeat(65)] {
            assert!(check_user_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn failures_limit_per_account_and_expire_by_window() {
        let limiter = FailureLimiter::default();
        let keys = [LimitKey::Account("a".into()), LimitKey::Address(IpAddr::from([127, 0, 0, 1]))];
        for _ in 0..AUTH_FAILURES_PER_ACCOUNT {
            assert!(limiter.check(&keys).is_ok());
            limiter.record(&keys);
        }
        assert_eq!(limiter.check(&keys).unwrap_err().code, ErrorCode::RATE_LIMITED);
        // Another account from the same address is still allowed (address limit is higher).
        assert!(
            limiter.check(&[LimitKey::Account("b".into()), LimitKey::Address(IpAddr::from([127, 0, 0, 1]))]).is_ok()
        );
        // An expired window no longer counts.
        limiter.windows.lock().unwrap().values_mut().for_each(|w| w.0 = 0);
        assert!(limiter.check(&keys).is_ok());
    }
}
