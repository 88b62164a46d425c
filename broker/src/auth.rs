//! Accounts and device proof. Passwords are argon2id PHC strings; a password is used
//! only to enroll a device key. Every connection then proves the device by signing
//! `auth_transcript_v5(exporter)` (version 4: `auth_transcript(nonce, exporter)`): the
//! TLS exporter value is unique to the session, so no bearer secret exists to steal.
//!
//! What a peer can make the broker do before it is authenticated is bounded here:
//! - Every request is checked cheaply (shape, name taken, registration open, the
//!   device's signature, the allowances below) before any password is hashed.
//! - Password hashing runs `ARGON2_CONCURRENCY` at a time with a short queue; a request
//!   beyond the queue is refused at once with `OVERLOADED` (`Argon2Pool`), and so is one
//!   beyond its source's quarter of the turns (`Shares`). The caller drops the future
//!   when the peer goes away, which takes it out of the queue.
//! - Password failures are counted per name tried and per source address, once a
//!   hashing slot is held (so no faster than the pool hashes); device
//!   signatures are counted apart, per source address only (`FailureLimiter`). A device
//!   that proves its key is never refused because others guessed the account's password.
//! - Registrations are limited per source address (a token bucket, `RegistrationLimiter`).
//! - Right passwords are limited per account (`LOGINS_PER_ACCOUNT`), so knowing one
//!   password does not buy unbounded hashing from many addresses.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use argon2::password_hash::{PasswordHasher, PasswordVerifier, phc::PasswordHash};
use ed25519_dalek::{Signature, VerifyingKey};
use switchboard_protocol::limits::{MAX_NAME_BYTES, MAX_PASSWORD_BYTES};
use switchboard_protocol::{DeviceId, Enroll, ErrorBody, ErrorCode, UserId};
use switchboard_storage::{DeviceRecord, Replace, SignOut, Store, StoreError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::background::BackgroundThreads;
use crate::config::Config;
use crate::limits::{
    ARGON2_CONCURRENCY, AUTH_FAILURE_KEYS_MAX, AUTH_FAILURE_WINDOW_MS, AUTH_FAILURES_PER_ACCOUNT,
    AUTH_FAILURES_PER_ADDRESS, BAD_SIGNATURES_PER_ADDRESS, LOGINS_PER_ACCOUNT, MAX_DEVICES_PER_USER,
    MIN_PASSWORD_BYTES, PASSWORD_PROOFS_PER_DEVICE, REGISTRATION_BUCKETS_MAX, SOURCES_PER_NETWORK,
};
use crate::reply::internal;
use crate::user::TokenBucket;

/// Authentication service shared by all connections.
pub struct Auth {
    store: Arc<Store>,
    argon: Argon2Pool,
    /// Wrong passwords, per name tried (whether an account has it or not) and per source
    /// address.
    passwords: FailureLimiter,
    /// Bad device signatures, per source address only.
    signatures: FailureLimiter,
    /// Password changes, right or wrong, per account only.
    password_changes: FailureLimiter,
    /// Password checks, right or wrong, per source address and network
    /// (`Config::password_checks_per_address`; `None`: no such bound).
    hashes: Option<FailureLimiter>,
    /// Logins with the right password, per account only (`LOGINS_PER_ACCOUNT`).
    logins: FailureLimiter,
    registrations: RegistrationLimiter,
    registration_open: bool,
    unconfirmed_device_grace_ms: u64,
    /// A hash of no one's password, verified for a login naming an account that does not
    /// exist: that login costs the same argon2 work as a wrong password, so its timing
    /// does not tell whether the account exists.
    decoy_phc: String,
}

/// A registration that passed every check: the device key it enrolls and the password
/// hash to store. Nothing is written yet.
pub struct Registration {
    /// The device's verified Ed25519 public key.
    pub key: [u8; 32],
    /// argon2id PHC string of the password.
    pub hash: String,
}

fn fail(code: ErrorCode, msg: &str) -> ErrorBody {
    ErrorBody::new(code, msg)
}

/// An address's password checks are spent (`Config::password_checks_per_address`).
fn hashes_spent() -> ErrorBody {
    fail(ErrorCode::RATE_LIMITED, "too many password checks from this address; try again in a minute")
}

fn wrong_password() -> ErrorBody {
    fail(ErrorCode::AUTH_FAILED, "wrong user name or password")
}

/// `ACCOUNT_DISABLED` if the operator disabled `user`'s account. Asked only once a
/// password or a device signature proved the caller, so the answer tells a stranger
/// nothing.
pub(crate) fn refuse_if_disabled(store: &Store, user: UserId) -> Result<(), ErrorBody> {
    if store.disabled(user).map_err(internal)? {
        return Err(fail(ErrorCode::ACCOUNT_DISABLED, "this account is disabled by the broker's operator"));
    }
    Ok(())
}

/// The key a device proof is checked against when its name or device does not exist
/// (`Auth::authenticate`), so that the check costs the same either way. Its secret is
/// no secret (it is here): a signature that verifies against it proves nothing, since
/// there is no device for it to let in.
fn decoy_key() -> [u8; 32] {
    static DECOY: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    *DECOY.get_or_init(|| ed25519_dalek::SigningKey::from_bytes(&[0x5b; 32]).verifying_key().to_bytes())
}

/// Whether `hash` was made under `params`' memory, passes and lanes (the broker's
/// argon2 cost now); a hash whose parameters cannot be read counts as another cost.
fn same_cost(hash: &PasswordHash, params: &argon2::Params) -> bool {
    argon2::Params::try_from(hash).is_ok_and(|made| {
        (made.m_cost(), made.t_cost(), made.p_cost()) == (params.m_cost(), params.t_cost(), params.p_cost())
    })
}

/// Which key a device proof is checked against (`Auth::authenticate`).
enum Proof {
    /// The device's own: a proof lets it in.
    Enrolled,
    /// The key the device had before it was removed: a proof is `DEVICE_REVOKED`.
    Revoked,
}

fn wrong_current_password() -> ErrorBody {
    fail(ErrorCode::AUTH_FAILED, "wrong current password")
}

impl Auth {
    /// An auth service over `store` with `config`'s argon2id cost and allowances.
    pub fn new(store: Arc<Store>, config: &Config) -> crate::error::Result<Self> {
        let params = argon2::Params::new(config.argon2_memory_kib, config.argon2_iterations, 1, None)
            .map_err(|e| crate::Error::Config(format!("argon2 parameters: {e}")))?;
        let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let decoy_phc = argon
            .hash_password(b"switchboard decoy: no account has this password")
            .map_err(|e| crate::Error::Config(format!("argon2: {e}")))?
            .to_string();
        Ok(Auth {
            decoy_phc,
            store,
            argon: Argon2Pool::new(argon, config.argon2_queue, config.idle_background_work())
                .map_err(|error| crate::Error::Io { context: "starting the password hashing threads".into(), error })?,
            passwords: FailureLimiter::new(
                "failed passwords",
                AUTH_FAILURE_KEYS_MAX,
                AUTH_FAILURES_PER_ACCOUNT,
                AUTH_FAILURES_PER_ADDRESS,
            ),
            signatures: FailureLimiter::new(
                "bad device signatures",
                AUTH_FAILURE_KEYS_MAX,
                0,
                BAD_SIGNATURES_PER_ADDRESS,
            ),
            password_changes: FailureLimiter::new(
                "password proofs",
                AUTH_FAILURE_KEYS_MAX,
                PASSWORD_PROOFS_PER_DEVICE,
                0,
            ),
            hashes: (config.password_checks_per_address > 0).then(|| {
                FailureLimiter::new("password checks", AUTH_FAILURE_KEYS_MAX, 0, config.password_checks_per_address)
            }),
            logins: FailureLimiter::new("logins with the right password", AUTH_FAILURE_KEYS_MAX, LOGINS_PER_ACCOUNT, 0),
            registrations: RegistrationLimiter::new(
                config.registration_burst_per_address,
                config.registration_interval_ms,
                REGISTRATION_BUCKETS_MAX,
            ),
            registration_open: config.registration_open,
            unconfirmed_device_grace_ms: config.unconfirmed_device_grace_ms,
        })
    }

    /// Checks a registration from `from` and hashes its password. In this order:
    /// registration closed (`REGISTRATION_CLOSED`), a bad name or password (`INVALID`), a
    /// bad device name, key or signature (`INVALID`, `AUTH_FAILED`), a full password
    /// queue (`OVERLOADED`), the address's registration allowance (`RATE_LIMITED`), a
    /// taken name (`CONFLICT`); then the hash. A taken name spends an allowance: asking
    /// whether names exist is limited as password guesses are (before, it was free, which
    /// made the decoy work of `check_login` for unknown names pointless).
    pub async fn check_register(
        &self,
        req: &Enroll,
        transcript: &[u8],
        from: IpAddr,
    ) -> Result<Registration, ErrorBody> {
        if !self.registration_open {
            return Err(fail(ErrorCode::REGISTRATION_CLOSED, "registration is closed on this broker"));
        }
        check_user_name(&req.user)?;
        check_password(&req.password)?;
        let key = verify_enrollment(req, transcript)?;
        let turn = self.argon.turn(Some(from))?;
        self.registrations.take(from, Instant::now())?;
        if self.store.user_by_name(&req.user).map_err(internal)?.is_some() {
            return Err(fail(ErrorCode::CONFLICT, "user name is taken"));
        }
        let password = req.password.clone();
        let hash = self.argon.run(turn, move |argon| argon.hash_password(password.as_bytes()).map(|h| h.to_string()));
        Ok(Registration { key, hash: hash.await?.map_err(internal)? })
    }

    /// Checks a password login from `from`: returns the account, the verified device
    /// key to enroll, and the password hash the password was checked against (`enroll`
    /// enrolls only while it is still the account's). Wrong passwords count against the
    /// source address and against the name, whether an account has it or not: a name
    /// that exists and one that does not take the same checks in the same order, the
    /// same work, the same counts and, after `AUTH_FAILURES_PER_ACCOUNT` failures, the
    /// same `RATE_LIMITED` (before, only names that exist were counted, so the eleventh
    /// wrong password said which names exist). A bad device key or signature is refused
    /// before anything is counted, a password is counted once its hash holds a slot.
    /// A name that cannot exist (or a password too long for any account) is refused at
    /// once, uncounted: nothing is guessed and no work is done. A right password spends
    /// the account's allowance of logins (`LOGINS_PER_ACCOUNT` a window, from any
    /// address): past it, the same `RATE_LIMITED` before the hash as after ten wrong
    /// guesses (two logins racing past the check may be refused after theirs). Only
    /// while its owner spends it does a name that exists answer so without guesses.
    pub async fn check_login(
        &self,
        req: &Enroll,
        transcript: &[u8],
        from: IpAddr,
    ) -> Result<(UserId, [u8; 32], String), ErrorBody> {
        let now = crate::now_ms();
        let addresses = address_keys(from);
        self.passwords.check(&addresses, now)?;
        // No account has such a name or password (registration and every password
        // change check the same rules): wrong, said at once, with no hash and no count.
        if check_user_name(&req.user).is_err() || check_password(&req.password).is_err() {
            return Err(wrong_password());
        }
        // The signature first: a login refused for it reads nothing, so its time does
        // not tell whether the name has an account (a review).
        let key = verify_enrollment(req, transcript)?;
        let user = self.store.user_by_name(&req.user).map_err(internal)?;
        let mut keys = vec![LimitKey::Name(*blake3::hash(req.user.as_bytes()).as_bytes())];
        keys.extend(addresses.iter().cloned());
        self.passwords.check(&keys, now)?;
        // Only a right password spends this, so only whoever knows it can make a name
        // answer `RATE_LIMITED` here, and with the very answer ten wrong guesses at any
        // name get: that a name is refused does not say that an account has it.
        let account = user.as_ref().map(|&(id, _)| [LimitKey::Account(id)]);
        if let Some(account) = &account {
            self.logins.check(account, now)?;
        }
        self.hash_allowed(&addresses, now)?;
        let slot = self.argon.slot(self.argon.turn(Some(from))?).await?;
        self.charge_hash(&addresses, crate::now_ms())?;
        // Counted once a hashing slot is held and before the (slow) check: concurrent
        // guesses cannot all pass the limit at once (`record` checks it again: others
        // may have counted while this one waited), and every failure counted takes a
        // whole hash of the pool's time, even if its peer leaves (a peer that leaves
        // while queued counts nothing). So the failure table grows no faster than the
        // pool hashes. Refunded when the password is right.
        self.passwords.record(&keys, crate::now_ms())?;
        let Some((user, record)) = user else {
            // The same work as for an account that exists (see `decoy_phc`).
            let (password, phc) = (req.password.clone(), self.decoy_phc.clone());
            self.argon
                .run_holding(slot, move |argon| {
                    if let Ok(parsed) = PasswordHash::new(&phc) {
                        let _ = argon.verify_password(password.as_bytes(), &parsed);
                    }
                })
                .await?;
            // Logged at debug, as every refused proof (an operator's trial found a wrong
            // password logged nowhere): names are not, as the limits do not keep them.
            tracing::debug!(from = %from, "login refused: no account has the name");
            return Err(wrong_password());
        };
        let (password, phc) = (req.password.clone(), record.password_hash.clone());
        let right = self.argon.run_holding(slot, move |argon| {
            let parsed = PasswordHash::new(&phc).map_err(internal)?;
            if argon.verify_password(password.as_bytes(), &parsed).is_err() {
                return Ok::<_, ErrorBody>(None);
            }
            // Made again under the broker's cost if it was made under another.
            let rehash = !same_cost(&parsed, argon.params());
            let rehashed = rehash.then(|| argon.hash_password(password.as_bytes()).map(|h| h.to_string()));
            Ok(Some(rehashed.transpose().map_err(internal)?))
        });
        let Some(rehashed) = right.await?? else {
            tracing::debug!(user, from = %from, "login refused: wrong password");
            return Err(wrong_password());
        };
        self.passwords.refund(&keys);
        if let Some(account) = &account {
            self.logins.record(account, crate::now_ms())?;
        }
        refuse_if_disabled(&self.store, user)?;
        let verified = match rehashed {
            Some(new) => self.store_rehash(user, record.password_hash, new).await?,
            None => record.password_hash,
        };
        Ok((user, key, verified))
    }

    /// Verifies an enrolled device's signature over `transcript`.
    ///
    /// A signature by the key of a device since removed (revoked by the user or the
    /// operator, signed out by a password change, or given way to a new enrollment; the
    /// user's `switchboard_storage::REVOKED_KEYS_KEPT` removed most lately) is `DEVICE_REVOKED`, so its client stops and
    /// says why; by any other key, `AUTH_FAILED`.
    ///
    /// Device proof is limited per source address only, by its own count of bad
    /// signatures: a failed proof is `RATE_LIMITED` once that address has used up its
    /// bad-signature budget (`BAD_SIGNATURES_PER_ADDRESS` a window); a valid signature
    /// always succeeds. Wrong passwords, for the account or from the address, never
    /// count here. A user name
    /// that cannot exist is `AUTH_FAILED`, counted against the address like any bad
    /// signature, and never looked up or kept.
    pub fn authenticate(
        &self,
        user_name: &str,
        device: DeviceId,
        signature: &[u8],
        transcript: &[u8],
        from: IpAddr,
    ) -> Result<UserId, ErrorBody> {
        let now = crate::now_ms();
        let address = [LimitKey::Address(source(from))];
        // The device's key, or else its key kept since its revocation (`Revoked`).
        let found = match check_user_name(user_name) {
            Ok(()) => match self.store.user_by_name(user_name).map_err(internal)? {
                Some((user, _)) => {
                    // Both read whatever the first finds: the same reads for every name and
                    // device, enrolled, revoked or neither.
                    let enrolled = self.store.device(user, device).map_err(internal)?;
                    let revoked = self.store.revoked_key(user, device).map_err(internal)?;
                    match enrolled {
                        Some(d) => Some((user, Proof::Enrolled, d.public_key)),
                        None => revoked.map(|key| (user, Proof::Revoked, key)),
                    }
                }
                // The same reads and check as for a name that exists, against a decoy
                // key: past the address's budget a probe still costs the broker a check,
                // and its time must not tell which names and devices exist.
                None => {
                    let _ = self.store.device(0, device);
                    let _ = self.store.revoked_key(0, device);
                    None
                }
            },
            Err(_) => None,
        };
        // The decoy's bytes are decompressed as an enrolled key's are, each time (a
        // decoy kept decompressed answered an unknown device a point decompression
        // sooner: a review), and checked as strictly (`verify_strict`: a weak key, one
        // enrolled before weak keys were refused, proves nothing).
        let key = VerifyingKey::from_bytes(found.as_ref().map_or(&decoy_key(), |(_, _, public_key)| public_key)).ok();
        let proved = key.is_some_and(|key| {
            Signature::from_slice(signature).is_ok_and(|sig| key.verify_strict(transcript, &sig).is_ok())
        });
        let verified = found.filter(|_| proved).map(|(user, proof, _)| (user, proof));
        match verified {
            Some((user, Proof::Enrolled)) => {
                refuse_if_disabled(&self.store, user)?;
                Ok(user)
            }
            // Only the holder of the revoked key learns it was revoked (anyone else naming
            // the device is refused as for one never enrolled), and it is not a guess, so
            // the address's budget is not spent: a client told this stops for good.
            Some((_, Proof::Revoked)) => {
                tracing::debug!(device, from = %from, "device proof refused: the device was revoked");
                Err(fail(ErrorCode::DEVICE_REVOKED, "this device was revoked"))
            }
            // Only a failed proof meets the address's budget: a device that proves its key
            // is never refused for what others at its address (a carrier NAT, an IPv6
            // /64) guessed (before, the budget was checked first, and 300 bad signatures
            // a minute from one host locked every device behind the same address out).
            // The lookup and the check cost tens of microseconds, a small part of the
            // QUIC and TLS handshake each attempt must make first.
            None => {
                tracing::debug!(device, from = %from, "device proof refused: unknown device or bad signature");
                self.signatures.check(&address, now)?;
                self.signatures.record(&address, now)?;
                Err(fail(ErrorCode::AUTH_FAILED, "unknown device or bad signature"))
            }
        }
    }

    /// Records that `device` authenticated after its enrollment (so it never gives way
    /// to a new enrollment). Durable when it returns; a no-op read when confirmed already.
    pub async fn confirm(&self, user: UserId, device: DeviceId) -> Result<(), ErrorBody> {
        if !self.store.device_unconfirmed(user, device).map_err(internal)? {
            return Ok(());
        }
        let confirmed = crate::catalog::catalog_write(&self.store, move |s| s.confirm_device(user, device)).await?;
        if let Some(durable) = confirmed.map_err(internal)? {
            durable.await.map_err(internal)?;
        }
        Ok(())
    }

    /// Password hashes (registrations, logins, password changes) running or queued, of
    /// at most `ARGON2_CONCURRENCY` + `Config::argon2_queue` (past that, `OVERLOADED`).
    pub fn password_checks(&self) -> usize {
        self.argon.in_use()
    }

    /// Operator path: creates a user without a device (`switchboard user add`).
    pub async fn add_user(&self, name: &str, password: &str) -> Result<UserId, ErrorBody> {
        check_user_name(name)?;
        check_password(password)?;
        let turn = self.argon.turn(None)?;
        let password = password.to_owned();
        let hash = self.argon.run(turn, move |argon| argon.hash_password(password.as_bytes()).map(|h| h.to_string()));
        self.create_user(name, hash.await?.map_err(internal)?).await
    }

    /// Replaces the password of account `name` (an operator's reset); `NOT_FOUND` if
    /// there is none, `INVALID` for a password outside 8..=256 bytes. Durable when it
    /// returns. With `revoke_devices` every device of the account is removed in the same
    /// write, their connections closed by `closer` (a running broker's) once it is
    /// durable (`catalog::to_the_end`), and their ids returned; without, they keep
    /// working.
    pub async fn set_password(
        &self,
        name: &str,
        password: &str,
        revoke_devices: bool,
        closer: Option<crate::user::Closer>,
    ) -> Result<(UserId, Vec<DeviceId>), ErrorBody> {
        check_password(password)?;
        let (user, _) =
            self.store.user_by_name(name).map_err(internal)?.ok_or_else(|| crate::catalog::no_user(name))?;
        let turn = self.argon.turn(None)?;
        let password = password.to_owned();
        let hash = self.argon.run(turn, move |argon| argon.hash_password(password.as_bytes()).map(|h| h.to_string()));
        let hash = hash.await?.map_err(internal)?;
        let sign_out = if revoke_devices { SignOut::Everyone } else { SignOut::Nobody };
        let (store, gone) = (self.store.clone(), crate::catalog::no_user(name));
        crate::catalog::to_the_end(async move {
            let set = crate::catalog::catalog_write(&store, move |s| s.set_password(user, &hash, sign_out)).await?;
            let (durable, revoked) = set.map_err(internal)?.ok_or(gone)?;
            durable.await.map_err(internal)?;
            tracing::info!(user, revoked = revoked.len(), "password reset");
            if let (SignOut::Everyone, Some(closer)) = (sign_out, closer) {
                closer.revoke_all_but(user, None);
            }
            Ok((user, revoked))
        })
        .await
    }

    /// Whether the asker's address keys (`address_keys`) may have one more password
    /// checked (`Config::password_checks_per_address`), before it asks for a turn.
    fn hash_allowed(&self, addresses: &[LimitKey], now_ms: u64) -> Result<(), ErrorBody> {
        match &self.hashes {
            Some(hashes) => hashes.check(addresses, now_ms).map_err(|_| hashes_spent()),
            None => Ok(()),
        }
    }

    /// Counts one password check against the asker's address keys, once its hashing
    /// slot is held (a turn refused, or given up while queued, costs nothing: the
    /// client library retries those), or `RATE_LIMITED` (the slot let go) if others
    /// counted the last one meanwhile.
    fn charge_hash(&self, addresses: &[LimitKey], now_ms: u64) -> Result<(), ErrorBody> {
        match &self.hashes {
            Some(hashes) => hashes.record(addresses, now_ms).map_err(|_| hashes_spent()),
            None => Ok(()),
        }
    }

    /// A signed-in user's own password change (`ChangePassword`). Checked in this order:
    /// the new password's length (`INVALID`, before any work), the current one's
    /// (`AUTH_FAILED` outside 8 to 256 bytes, uncounted: no account has one), the asking
    /// device's allowance of proofs (`PASSWORD_PROOFS_PER_DEVICE` a window, right or
    /// wrong: `RATE_LIMITED`),
    /// `from`'s password checks (`Config::password_checks_per_address`: `RATE_LIMITED`),
    /// a full password queue, or `from`'s share of it (the address the session's
    /// handshake came from: `OVERLOADED`); then one turn of the password pool checks
    /// `current` and hashes `new`. A wrong `current` is `AUTH_FAILED`: an unlocked device
    /// in someone else's hands guesses at most that many a window, and a signed-in user
    /// cannot keep the pool that every login waits on busy. The allowance is the
    /// device's own: a stranger's failed logins, and another device's wrong guesses,
    /// never stop the owner's change. The new hash is stored only if the
    /// account's hash is still the one `current` was checked against, in the same
    /// catalog write: of two changes racing from the same password one wins, the other
    /// is `AUTH_FAILED`. `asker`, the device asking, must not have been cut off since it
    /// asked (`catalog::refusal_to`). With `sign_out_others` (the closer of their
    /// sessions) every other device of the account is removed in the same write, their
    /// connections closed once it is durable (`catalog::to_the_end`), and returned.
    /// Durable when it returns.
    pub(crate) async fn change_password(
        &self,
        user: UserId,
        asker: crate::catalog::Asker,
        from: IpAddr,
        current: &str,
        new: &str,
        sign_out_others: Option<crate::user::Closer>,
    ) -> Result<Vec<DeviceId>, ErrorBody> {
        check_password(new)?;
        let (verified, slot) = self.proof_turn(user, asker.device, from, current).await?;
        let (current, new) = (current.to_owned(), new.to_owned());
        let phc = verified.clone();
        let hashed = self.argon.run_holding(slot, move |argon| {
            if !password_matches(argon, &phc, &current)? {
                return Ok(None);
            }
            argon.hash_password(new.as_bytes()).map(|h| Some(h.to_string())).map_err(internal)
        });
        let Some(hash) = hashed.await?? else { return Err(wrong_current_password()) };
        // The device asking must still be enrolled as the change is written (on the
        // catalog thread, in order with revokes): a change in flight from a device
        // revoked meanwhile must not land after its revoke was answered.
        let sign_out = if sign_out_others.is_some() { SignOut::AllBut(asker.device) } else { SignOut::Nobody };
        let (store, keep) = (self.store.clone(), asker.device);
        crate::catalog::to_the_end(async move {
            let set = crate::catalog::catalog_write(&store, move |s| {
                match crate::catalog::refusal_to(s, user, &asker) {
                    Ok(Some(refused)) => return Err(refused),
                    Ok(None) => {}
                    Err(e) => return Ok(Some(Err(e))),
                }
                match s.user(user) {
                    Ok(Some(account)) if account.password_hash == verified => {
                        Ok(Some(s.set_password(user, &hash, sign_out)))
                    }
                    Ok(_) => Ok(None),
                    Err(e) => Ok(Some(Err(e))),
                }
            })
            .await??;
            let (durable, revoked) =
                set.ok_or_else(wrong_current_password)?.map_err(internal)?.ok_or_else(wrong_current_password)?;
            durable.await.map_err(internal)?;
            tracing::info!(user, revoked = revoked.len(), "password changed by its user");
            if let Some(closer) = sign_out_others {
                closer.revoke_all_but(user, Some(keep));
            }
            Ok(revoked)
        })
        .await
    }

    /// The checks before a signed-in user's password proof (`ChangePassword`'s current
    /// password, `RevokeOtherDevice`'s), in `change_password`'s order: `password`'s
    /// length (`AUTH_FAILED`, uncounted), the asking device's allowance of proofs
    /// (`PASSWORD_PROOFS_PER_DEVICE` a window, right or wrong: `RATE_LIMITED`), `from`'s
    /// password checks, the password queue; then a turn of the password pool. Returns the
    /// account's hash to check `password` against and the pool's slot to check it in.
    /// The allowance is the device's, not the account's: a stolen phone's wrong guesses
    /// spent the account's, and its owner's `ChangePassword` and `RevokeOtherDevice` were
    /// refused for as long as it went on (a review).
    async fn proof_turn(
        &self,
        user: UserId,
        device: DeviceId,
        from: IpAddr,
        password: &str,
    ) -> Result<(String, Slot), ErrorBody> {
        // No account has such a password (as in `check_login`): wrong, at once, with no
        // hash and nothing counted.
        if check_password(password).is_err() {
            return Err(wrong_current_password());
        }
        let now = crate::now_ms();
        let keys = [LimitKey::Device(user, device)];
        let too_many =
            |_| fail(ErrorCode::RATE_LIMITED, "too many password proofs from this device; try again in a minute");
        // Counted before any work, and refunded only when no password was checked (no
        // hashing turn): concurrent requests cannot all pass the check before one is
        // counted.
        self.password_changes.check(&keys, now).map_err(too_many)?;
        self.password_changes.record(&keys, now).map_err(too_many)?;
        let record = self.store.user(user).map_err(internal)?.ok_or_else(wrong_current_password)?;
        // No turn (`OVERLOADED`, others' logins filling the queue, or the address's hashes
        // spent): nothing was tried, so the proof is not counted against the owner's
        // allowance.
        let addresses = address_keys(from);
        self.hash_allowed(&addresses, now).inspect_err(|_| self.password_changes.refund(&keys))?;
        let turn = self.argon.turn(Some(from)).inspect_err(|_| self.password_changes.refund(&keys))?;
        let slot = self.argon.slot(turn).await?;
        self.charge_hash(&addresses, crate::now_ms()).inspect_err(|_| self.password_changes.refund(&keys))?;
        Ok((record.password_hash, slot))
    }

    /// A signed-in user's proof of the account's password (`RevokeOtherDevice`), checked
    /// and limited as `ChangePassword`'s current password (`proof_turn`): `Ok` if
    /// `password` is the account's, `AUTH_FAILED` if not.
    pub(crate) async fn prove_password(
        &self,
        user: UserId,
        device: DeviceId,
        from: IpAddr,
        password: &str,
    ) -> Result<(), ErrorBody> {
        let (phc, slot) = self.proof_turn(user, device, from, password).await?;
        let password = password.to_owned();
        let proved = self.argon.run_holding(slot, move |argon| password_matches(argon, &phc, &password));
        if proved.await?? { Ok(()) } else { Err(wrong_current_password()) }
    }

    /// Replaces `user`'s password hash `verified`, made under another argon2 cost than the
    /// broker's (`argon2_memory_kib`, `argon2_iterations` changed since), with `new`, the
    /// same password hashed under the broker's, if it is still the account's (a change or
    /// reset meanwhile wins); the hash the login was checked against then: the one stored.
    /// Durable when it returns.
    ///
    /// Why: a login for a name no account has is checked against a decoy hashed under
    /// the broker's cost (`decoy_phc`), so its time tells nothing; an account whose hash
    /// was made under another cost took a time of its own, and once the operator changed
    /// the cost, a wrong password's time told which names had such accounts (an attacker
    /// review). Each account is hashed again at its first login since: accounts that
    /// never log in keep their old cost (OPERATIONS.md says so).
    async fn store_rehash(&self, user: UserId, verified: String, new: String) -> Result<String, ErrorBody> {
        let stored = new.clone();
        let set = crate::catalog::catalog_write(&self.store, move |s| match s.user(user) {
            Ok(Some(account)) if account.password_hash == verified => {
                s.set_password(user, &new, SignOut::Nobody).map(|set| set.map(|(durable, _)| durable))
            }
            Ok(_) => Ok(None),
            Err(e) => Err(e),
        })
        .await?;
        match set.map_err(internal)? {
            Some(durable) => {
                durable.await.map_err(internal)?;
                tracing::info!(user, "password hash made again under the broker's argon2 cost");
                Ok(stored)
            }
            // Changed meanwhile: the enrollment that follows is refused as for a
            // password since reset (`enroll`).
            None => Err(wrong_password()),
        }
    }

    /// A registration from `from` that passed `check_register` was refused for want of
    /// room (`max_connections` reached while it was hashed: `OVERLOADED`, nothing
    /// created): its registration is given back to the address, so a client that tries
    /// again, as it should, does not spend the address's allowance on the broker's limit.
    pub fn registration_not_made(&self, from: IpAddr) {
        self.registrations.give_back(from, Instant::now());
    }

    /// Stores a new account; `CONFLICT` if the name is taken. Durable when it returns.
    pub async fn create_user(&self, name: &str, hash: String) -> Result<UserId, ErrorBody> {
        let (name, name_for_log) = (name.to_owned(), name.to_owned());
        let created =
            crate::catalog::catalog_write(&self.store, move |s| s.create_user(&name, &hash, crate::now_ms())).await?;
        let (user, durable) = match created {
            Ok(v) => v,
            Err(StoreError::Conflict) => return Err(fail(ErrorCode::CONFLICT, "user name is taken")),
            Err(e) => return Err(internal(e)),
        };
        durable.await.map_err(internal)?;
        tracing::info!(user, name = %name_for_log, "account created");
        Ok(user)
    }

    /// Stores a device whose request `check_register` or `check_login` accepted,
    /// unconfirmed. At `MAX_DEVICES_PER_USER`, the oldest unconfirmed device enrolled
    /// more than `unconfirmed_device_grace_ms` ago and not in `in_use` gives way (its
    /// id is returned second; its connections are closed by `closer` once that is
    /// durable, even if the caller stopped waiting: `catalog::to_the_end`); if there is
    /// none, `FORBIDDEN`. Durable when it returns.
    ///
    /// `verified` is the password hash the enrolling password was checked against: the
    /// device is added only if it is still the account's, in the same catalog write (the
    /// catalog writes are serialised), so a login whose slow check began before an
    /// operator's password reset can no longer enroll after the reset revoked the
    /// account's devices; it is refused like a wrong password. Likewise an account the
    /// operator disabled meanwhile gets no device (`ACCOUNT_DISABLED`): before, one was
    /// enrolled and never told to its client, and worked once the account was enabled.
    pub async fn enroll(
        &self,
        user: UserId,
        device_name: &str,
        key: [u8; 32],
        in_use: Vec<DeviceId>,
        verified: String,
        closer: Option<crate::user::Closer>,
    ) -> Result<(DeviceId, Option<DeviceId>), ErrorBody> {
        let now = crate::now_ms();
        let record = DeviceRecord { name: device_name.to_owned(), public_key: key, enrolled_ms: now };
        let enrolled_before_ms = now.saturating_sub(self.unconfirmed_device_grace_ms);
        let store = self.store.clone();
        crate::catalog::to_the_end(async move {
            let added = crate::catalog::catalog_write(&store, move |s| -> Result<Option<_>, ErrorBody> {
                match s.user(user) {
                    Ok(Some(account)) if account.password_hash == verified => {}
                    Ok(_) => return Ok(None),
                    Err(e) => return Ok(Some(Err(e))),
                }
                refuse_if_disabled(s, user)?;
                let replace = Replace { enrolled_before_ms, in_use: &in_use };
                Ok(Some(s.add_device(user, &record, MAX_DEVICES_PER_USER, &replace)))
            })
            .await??;
            let Some(added) = added else { return Err(wrong_password()) };
            let (device, replaced, durable) = match added {
                Ok(v) => v,
                Err(StoreError::LimitReached) => {
                    return Err(fail(ErrorCode::FORBIDDEN, "device limit reached; revoke a device first"));
                }
                Err(e) => return Err(internal(e)),
            };
            durable.await.map_err(internal)?;
            tracing::info!(user, device, "device enrolled");
            if let Some(old) = replaced {
                tracing::info!(user, device = old, "an enrollment replaced a device that never authenticated");
                // Connected devices are never replaced; one that connected meanwhile is
                // closed here, or finds its device gone when it attaches.
                if let Some(closer) = closer {
                    closer.revoke(user, old);
                }
            }
            Ok((device, replaced))
        })
        .await
    }
}

/// Whether `password` is the one hashed in `phc` (a signed-in user's proof, on the
/// password pool: `proof_turn`'s slot). Blocking.
fn password_matches(argon: &argon2::Argon2<'static>, phc: &str, password: &str) -> Result<bool, ErrorBody> {
    let parsed = PasswordHash::new(phc).map_err(internal)?;
    Ok(argon.verify_password(password.as_bytes(), &parsed).is_ok())
}

/// Checks everything about an enrollment request that needs no account: the device
/// name, the key and its signature over this connection's transcript.
fn verify_enrollment(req: &Enroll, transcript: &[u8]) -> Result<[u8; 32], ErrorBody> {
    check_label(&req.device_name)?;
    let key: [u8; 32] =
        req.public_key.as_ref().try_into().map_err(|_| fail(ErrorCode::INVALID, "public key must be 32 bytes"))?;
    let verifying =
        VerifyingKey::from_bytes(&key).map_err(|_| fail(ErrorCode::INVALID, "not an Ed25519 public key"))?;
    // A key of small order (the identity point, say) verifies one signature for every
    // transcript: enrolled, anyone who learned the device's id could sign in as it
    // (ed25519-dalek's `verify` does not refuse such keys; `verify_strict` does; an
    // attacker review).
    if verifying.is_weak() {
        return Err(fail(ErrorCode::INVALID, "a weak Ed25519 public key (of small order)"));
    }
    let sig =
        Signature::from_slice(&req.signature).map_err(|_| fail(ErrorCode::INVALID, "signature must be 64 bytes"))?;
    verifying
        .verify_strict(transcript, &sig)
        .map_err(|_| fail(ErrorCode::AUTH_FAILED, "device signature does not verify"))?;
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

/// The one rule for every human-readable label (device names, group titles): 1 to 64
/// bytes (`MAX_NAME_BYTES`) that show what they say. `INVALID` if it holds
/// - a control character, or a line or paragraph separator (U+2028, U+2029);
/// - a bidirectional control (U+061C, U+200E, U+200F, U+202A–U+202E, U+2066–U+2069),
///   which can reorder what follows it: `pay\u{202E}fdp.exe` displays as `payexe.pdf`;
/// - any other format character (Unicode category Cf: zero-width space, word joiner,
///   soft hyphen, byte order mark, tag characters, ...) or a character that displays
///   as nothing (Hangul fillers, the braille blank, the combining grapheme joiner);
/// - a zero-width joiner or non-joiner (U+200D, U+200C) anywhere but between two
///   visible characters (where emoji sequences and Persian words need them), or a
///   variation selector anywhere but right after a visible character;
/// - a noncharacter (U+FDD0–U+FDEF, U+xFFFE, U+xFFFF);
/// - no visible character at all (nothing left once spaces and invisible characters
///   are trimmed).
///
/// Every script (right-to-left ones included), combining marks, emoji and spaces
/// between words are fine. Emoji tag sequences (subdivision flags) are refused with
/// the tag characters.
pub fn check_label(label: &str) -> Result<(), ErrorBody> {
    let refuse = || {
        Err(fail(
            ErrorCode::INVALID,
            "labels are 1-64 bytes of visible text: no control, format, direction or invisible characters",
        ))
    };
    if label.is_empty() || label.len() > MAX_NAME_BYTES as usize {
        return refuse();
    }
    let glyphs: Vec<Glyph> = label.chars().map(Glyph::of).collect();
    let mut visible = false;
    for (i, g) in glyphs.iter().enumerate() {
        let before = i.checked_sub(1).map(|j| glyphs[j]);
        let after = glyphs.get(i + 1).copied();
        let ok = match g {
            Glyph::Visible => {
                visible = true;
                true
            }
            Glyph::Space => true,
            Glyph::Hidden => false,
            Glyph::Joiner => matches!(before, Some(Glyph::Visible | Glyph::Selector)) && after == Some(Glyph::Visible),
            Glyph::Selector => before == Some(Glyph::Visible),
        };
        if !ok {
            return refuse();
        }
    }
    if visible { Ok(()) } else { refuse() }
}

/// How a character shows in a label (see `check_label`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Glyph {
    Visible,
    Space,
    /// U+200C, U+200D.
    Joiner,
    /// Variation selectors: they change the look of the character before them.
    Selector,
    /// Never allowed in a label.
    Hidden,
}

/// Format characters (Unicode 15 category Cf), separators, and characters that display
/// as nothing. Joiners and variation selectors are classified apart.
const HIDDEN: &[(u32, u32)] = &[
    (0x00AD, 0x00AD),   // soft hyphen
    (0x034F, 0x034F),   // combining grapheme joiner
    (0x0600, 0x0605),   // Arabic number signs
    (0x061C, 0x061C),   // Arabic letter mark
    (0x06DD, 0x06DD),   // Arabic end of ayah
    (0x070F, 0x070F),   // Syriac abbreviation mark
    (0x0890, 0x0891),   // Arabic pound and piastre marks above
    (0x08E2, 0x08E2),   // Arabic disputed end of ayah
    (0x115F, 0x1160),   // Hangul choseong and jungseong fillers
    (0x17B4, 0x17B5),   // Khmer inherent vowels
    (0x180B, 0x180F),   // Mongolian variation selectors and vowel separator
    (0x200B, 0x200B),   // zero-width space
    (0x200E, 0x200F),   // left-to-right and right-to-left marks
    (0x2028, 0x202E),   // line and paragraph separators, embeddings and overrides
    (0x2060, 0x206F),   // word joiner, invisible operators, isolates, deprecated formats
    (0x2800, 0x2800),   // braille pattern blank
    (0x3164, 0x3164),   // Hangul filler
    (0xFEFF, 0xFEFF),   // zero-width no-break space (byte order mark)
    (0xFFA0, 0xFFA0),   // halfwidth Hangul filler
    (0xFFF9, 0xFFFB),   // interlinear annotation controls
    (0x110BD, 0x110BD), // Kaithi number sign
    (0x110CD, 0x110CD), // Kaithi number sign above
    (0x13430, 0x1343F), // Egyptian hieroglyph format controls
    (0x1BCA0, 0x1BCA3), // shorthand format controls
    (0x1D173, 0x1D17A), // musical symbol format controls
    (0xE0000, 0xE007F), // tags
];

impl Glyph {
    fn of(c: char) -> Glyph {
        let u = u32::from(c);
        let noncharacter = (0xFDD0..=0xFDEF).contains(&u) || u & 0xFFFE == 0xFFFE;
        match u {
            0x200C | 0x200D => Glyph::Joiner,
            0xFE00..=0xFE0F | 0xE0100..=0xE01EF => Glyph::Selector,
            _ if c.is_control() || noncharacter || HIDDEN.iter().any(|&(lo, hi)| (lo..=hi).contains(&u)) => {
                Glyph::Hidden
            }
            _ if c.is_whitespace() => Glyph::Space,
            _ => Glyph::Visible,
        }
    }
}

/// The part of a source address one party controls, which limits are kept by: an IPv4
/// address, or the /64 network of an IPv6 one (a single host commonly holds a whole
/// /64, so counting its addresses one by one would give it 2^64 budgets). An
/// IPv4-mapped IPv6 address counts as its IPv4 address.
pub fn source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// The network a `source` belongs to, for weighing sources against each other: an IPv4
/// address itself (addresses are scarce, and a /24 commonly holds unrelated users), the
/// /48 of an IPv6 /64: a site's allocation (RFC 6177), which one party may get for
/// free (a tunnel broker hands out /48s), holding 65,536 sources.
pub fn network(source: IpAddr) -> IpAddr {
    match source {
        IpAddr::V4(_) => source,
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], 0, 0, 0, 0, 0))
        }
    }
}

/// argon2id work: at most `ARGON2_CONCURRENCY` hashes run at once (each on one of its
/// threads, holding its memory and a core) and at most `queue` requests wait for
/// a turn; one more is refused at once with `OVERLOADED`. A waiter whose future is
/// dropped (its connection closed) leaves the queue; a hash already running finishes,
/// holding its slot, so abandoned work never exceeds the slots. One source (an IPv4
/// address, an IPv6 /48) holds at most a quarter of the turns (`Shares`).
struct Argon2Pool {
    argon: argon2::Argon2<'static>,
    slots: Arc<Semaphore>,
    waiting: Arc<AtomicUsize>,
    queue: usize,
    shares: Arc<Shares>,
    /// The `ARGON2_CONCURRENCY` threads (`sb-password`) that hash, under `SCHED_IDLE`
    /// when the runtime runs under `SCHED_BATCH`: a flood of logins slows logins, not the
    /// chat of those connected.
    hashers: BackgroundThreads,
}

/// A turn in the pool, and the share of its source that it holds until its hash ends.
struct Turn {
    place: Place,
    share: Option<Share>,
}

/// Where a turn stands: a slot now, or a place in the queue.
enum Place {
    Now(OwnedSemaphorePermit),
    Queued(Waiting),
}

/// A slot to hash in, and the share of its source, held together until the hash ends.
struct Slot {
    permit: OwnedSemaphorePermit,
    share: Option<Share>,
}

/// Turns of the password pool held per source (`source_network`): at most `per_source`
/// each, a quarter of the slots and the queue (at least one). Without it one address
/// could hold every turn for good: failed passwords are limited per address
/// (`AUTH_FAILURES_PER_ADDRESS`), but a right one is refunded, so a peer logging in to
/// its own account over and over kept every other login and registration of the broker
/// answered `OVERLOADED`. Now it takes at least four sources to fill the pool (each
/// IPv6 /48 is one), and the turns are not queued fairly between them beyond that: a
/// bound on what one source takes, not a defence against many. The table holds only
/// sources with a turn, so it is never larger than the turns.
struct Shares {
    per_source: usize,
    held: Mutex<crate::limits::PerUser<IpAddr>>,
}

/// One turn's part of its source's share, given back when dropped.
struct Share {
    shares: Arc<Shares>,
    source: IpAddr,
}

impl Drop for Share {
    fn drop(&mut self) {
        self.shares.held.lock().unwrap_or_else(|p| p.into_inner()).give_back(self.source);
    }
}

impl Shares {
    /// A share for `source`, or `OVERLOADED` if it holds `per_source` turns already.
    fn take(self: &Arc<Self>, source: IpAddr) -> Result<Share, ErrorBody> {
        if !self.held.lock().unwrap_or_else(|p| p.into_inner()).take(source, self.per_source) {
            return Err(fail(
                ErrorCode::OVERLOADED,
                "too many password checks from this address in progress; retry shortly",
            ));
        }
        Ok(Share { shares: self.clone(), source })
    }
}

/// The source a password turn is counted against: an IPv4 address, or an IPv6 source's
/// /48 (a site, which can use any of its 65,536 /64s: `network`).
fn source_network(from: IpAddr) -> IpAddr {
    network(source(from))
}

/// A place in the queue, given back when dropped.
struct Waiting(Arc<AtomicUsize>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Argon2Pool {
    /// Hashing threads under `SCHED_IDLE` if `idle` (the runtime's threads under
    /// `SCHED_BATCH`), else as the caller runs (`BackgroundThreads`).
    fn new(argon: argon2::Argon2<'static>, queue: usize, idle: bool) -> std::io::Result<Self> {
        let per_source = (ARGON2_CONCURRENCY.saturating_add(queue) / 4).max(1);
        Ok(Argon2Pool {
            argon,
            slots: Arc::new(Semaphore::new(ARGON2_CONCURRENCY)),
            waiting: Arc::new(AtomicUsize::new(0)),
            queue,
            shares: Arc::new(Shares { per_source, held: Mutex::default() }),
            hashers: BackgroundThreads::start("sb-password", ARGON2_CONCURRENCY, idle)?,
        })
    }

    /// Hashes running or waiting for a slot.
    fn in_use(&self) -> usize {
        ARGON2_CONCURRENCY.saturating_sub(self.slots.available_permits()) + self.waiting.load(Ordering::SeqCst)
    }

    /// A turn for a request from `from` (`None`: an operator's, which always queues), or
    /// `OVERLOADED` if its source holds its share of turns already (`Shares`), or every
    /// slot is busy and the queue is full.
    fn turn(&self, from: Option<IpAddr>) -> Result<Turn, ErrorBody> {
        let share = from.map(|from| self.shares.take(source_network(from))).transpose()?;
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            return Ok(Turn { place: Place::Now(slot), share });
        }
        // An operator's turn (the admin socket: two at a time) always queues: a queue full
        // of clients' checks refused `user add` and `user passwd`, so an operator could not
        // reset a password while the broker was being flooded (an attacker review).
        let bound = if from.is_some() { self.queue } else { usize::MAX };
        self.waiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| (w < bound).then_some(w + 1))
            .map_err(|_| fail(ErrorCode::OVERLOADED, "too many password checks in progress; retry shortly"))?;
        Ok(Turn { place: Place::Queued(Waiting(self.waiting.clone())), share })
    }

    /// Waits for `turn`'s slot, then runs `job` on a hasher thread holding it.
    async fn run<T: Send + 'static>(
        &self,
        turn: Turn,
        job: impl FnOnce(&argon2::Argon2<'static>) -> T + Send + 'static,
    ) -> Result<T, ErrorBody> {
        let slot = self.slot(turn).await?;
        self.run_holding(slot, job).await
    }

    /// Waits for `turn`'s slot (at once for `Place::Now`).
    async fn slot(&self, turn: Turn) -> Result<Slot, ErrorBody> {
        let permit = match turn.place {
            Place::Now(slot) => slot,
            Place::Queued(waiting) => {
                let slot = self.slots.clone().acquire_owned().await.map_err(internal)?;
                drop(waiting);
                slot
            }
        };
        Ok(Slot { permit, share: turn.share })
    }

    /// Runs `job` on a hasher thread holding `slot`: the slot and its source's share are
    /// given back when the hash ends, even if the caller stopped waiting for it.
    async fn run_holding<T: Send + 'static>(
        &self,
        slot: Slot,
        job: impl FnOnce(&argon2::Argon2<'static>) -> T + Send + 'static,
    ) -> Result<T, ErrorBody> {
        let argon = self.argon.clone();
        // The slot is given back before the answer (also when `job` panics): a caller
        // that got its answer finds it free.
        self.hashers
            .run(move || {
                let Slot { permit: _permit, share: _share } = slot;
                job(&argon)
            })
            .await
            .map_err(internal)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum LimitKey {
    /// An existing account, by id (logins with the right password).
    Account(UserId),
    /// One device of an account (its password proofs: `ChangePassword`,
    /// `RevokeOtherDevice`), limited as an account is.
    Device(UserId, DeviceId),
    /// A user name tried at login, by its BLAKE3 hash (32 bytes whatever the name's
    /// length), whether an account has it or not.
    Name([u8; 32]),
    /// A source address (see `source`).
    Address(IpAddr),
    /// The /48 of an IPv6 source (see `network`), counted besides the source.
    Network(IpAddr),
}

/// The address keys a failure from `from` counts against: its source, and for an IPv6
/// source its /48 as well (`SOURCES_PER_NETWORK`).
fn address_keys(from: IpAddr) -> Vec<LimitKey> {
    let place = source(from);
    let mut keys = vec![LimitKey::Address(place)];
    // By kind, not by comparing addresses: a site's first /64 and the site itself are
    // the same `IpAddr`, but two keys.
    if place.is_ipv6() {
        keys.push(LimitKey::Network(network(place)));
    }
    keys
}

/// Counts failures per key in fixed windows. Successes cost nothing, so a storm of
/// valid devices is never slowed. At most `capacity` keys: when a failure needs a new
/// key and the table is full even after dropping expired windows (at most once a
/// second), the attempt is refused with `RATE_LIMITED` instead of going uncounted.
/// A live window is never evicted, so filling the table cannot lift a limit.
struct FailureLimiter {
    /// What it limits, for the log.
    what: &'static str,
    capacity: usize,
    per_account: u32,
    per_address: u32,
    table: Mutex<FailureTable>,
}

#[derive(Default)]
struct FailureTable {
    windows: HashMap<LimitKey, Window>,
    /// When expired windows were last dropped (ms since the epoch).
    pruned_ms: Option<u64>,
}

#[derive(Clone, Copy, Debug)]
struct Window {
    start_ms: u64,
    count: u32,
    /// Its reaching the bound was logged (once a window: refusals are not logged each).
    logged: bool,
}

impl Window {
    fn live(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.start_ms) < AUTH_FAILURE_WINDOW_MS
    }
}

fn too_many() -> ErrorBody {
    fail(ErrorCode::RATE_LIMITED, "too many attempts with this name or from this address; try again in a minute")
}

impl std::fmt::Display for LimitKey {
    /// For the log: an account by id, a name only as "a user name" (the table keeps its
    /// hash), an address or network as it is.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LimitKey::Account(id) => write!(f, "account {id}"),
            LimitKey::Device(id, device) => write!(f, "device {device} of account {id}"),
            LimitKey::Name(_) => write!(f, "a user name"),
            LimitKey::Address(ip) => write!(f, "address {ip}"),
            LimitKey::Network(ip) => write!(f, "network {ip}/48"),
        }
    }
}

impl FailureLimiter {
    fn new(what: &'static str, capacity: usize, per_account: u32, per_address: u32) -> Self {
        FailureLimiter { what, capacity, per_account, per_address, table: Mutex::default() }
    }

    fn max_failures(&self, key: &LimitKey) -> u32 {
        match key {
            LimitKey::Account(_) | LimitKey::Device(..) | LimitKey::Name(_) => self.per_account,
            LimitKey::Address(_) => self.per_address,
            LimitKey::Network(_) => self.per_address.saturating_mul(SOURCES_PER_NETWORK),
        }
    }

    /// `RATE_LIMITED` if any key has used up its failures in its current window.
    fn check(&self, keys: &[LimitKey], now_ms: u64) -> Result<(), ErrorBody> {
        let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        for key in keys {
            if let Some(w) = table.windows.get(key)
                && w.live(now_ms)
                && w.count >= self.max_failures(key)
            {
                return Err(too_many());
            }
        }
        Ok(())
    }

    /// Counts one failure against every key, or none and `RATE_LIMITED` if a key has
    /// used up its failures (checked under the same lock as the count, so attempts
    /// checked at once cannot count past the bound) or is new and the table has no
    /// room for it.
    fn record(&self, keys: &[LimitKey], now_ms: u64) -> Result<(), ErrorBody> {
        let mut guard = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let table = &mut *guard;
        let spent = |key: &LimitKey| {
            table.windows.get(key).is_some_and(|w| w.live(now_ms) && w.count >= self.max_failures(key))
        };
        if keys.iter().any(spent) {
            return Err(too_many());
        }
        let new = |t: &FailureTable| keys.iter().filter(|k| !t.windows.contains_key(k)).count();
        if table.windows.len() + new(table) > self.capacity {
            if table.pruned_ms.is_none_or(|at| now_ms.saturating_sub(at) >= 1000) {
                table.pruned_ms = Some(now_ms);
                table.windows.retain(|_, w| w.live(now_ms));
                if table.windows.len() + new(table) > self.capacity {
                    tracing::warn!(
                        keys = table.windows.len(),
                        "auth failure table full; refusing attempts it cannot count"
                    );
                }
            }
            if table.windows.len() + new(table) > self.capacity {
                return Err(too_many());
            }
        }
        for key in keys {
            let w = table.windows.entry(*key).or_insert(Window { start_ms: now_ms, count: 0, logged: false });
            if !w.live(now_ms) {
                *w = Window { start_ms: now_ms, count: 0, logged: false };
            }
            w.count = w.count.saturating_add(1);
            if w.count >= self.max_failures(key) && !w.logged {
                // What an operator looks for when users say they are refused, with where
                // the attempt that reached it came from (a name's limit said only "a user
                // name": an operator's trial could not tell who was guessing).
                w.logged = true;
                let from = keys.iter().filter(|k| matches!(k, LimitKey::Address(_))).map(ToString::to_string);
                let from = from.collect::<Vec<_>>().join(", ");
                tracing::warn!(limit = self.what, key = %key, from = %from, "limit reached; refused until the minute ends");
            }
        }
        Ok(())
    }

    /// Takes back one counted failure per key (the attempt turned out to be right).
    fn refund(&self, keys: &[LimitKey]) {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        for key in keys {
            if let Some(w) = table.windows.get_mut(key) {
                w.count = w.count.saturating_sub(1);
            }
        }
    }
}

/// Registrations per source address: a token bucket each, `burst` then one every
/// `interval_ms`. At most `capacity` addresses; at the cap, refilled buckets (the same
/// as none) are dropped at most once a second, and if none has refilled a new
/// address's registration is refused with `RATE_LIMITED`.
struct RegistrationLimiter {
    burst: f64,
    per_s: f64,
    capacity: usize,
    table: Mutex<Buckets>,
}

#[derive(Default)]
struct Buckets {
    /// By source address, and by the /48 of IPv6 sources (`address_keys`).
    buckets: HashMap<LimitKey, TokenBucket>,
    pruned: Option<Instant>,
}

impl RegistrationLimiter {
    fn new(burst: u32, interval_ms: u64, capacity: usize) -> Self {
        RegistrationLimiter {
            burst: f64::from(burst),
            per_s: 1000.0 / interval_ms.max(1) as f64,
            capacity,
            table: Mutex::default(),
        }
    }

    /// The burst and refill rate (per second) of `key`'s allowance.
    fn allowance(&self, key: &LimitKey) -> (f64, f64) {
        match key {
            LimitKey::Network(_) => {
                let sources = f64::from(SOURCES_PER_NETWORK);
                (self.burst * sources, self.per_s * sources)
            }
            _ => (self.burst, self.per_s),
        }
    }

    /// Takes a registration from the allowance of `from`'s source and, for an IPv6
    /// source, of its /48; `RATE_LIMITED` (and nothing taken) if either has none left or
    /// the table has no room for a new one.
    fn take(&self, from: IpAddr, now: Instant) -> Result<(), ErrorBody> {
        let limited = || Err(fail(ErrorCode::RATE_LIMITED, "too many registrations from this address; try later"));
        let keys = address_keys(from);
        let mut guard = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let Buckets { buckets, pruned } = &mut *guard;
        let new = |b: &HashMap<LimitKey, TokenBucket>| keys.iter().filter(|k| !b.contains_key(k)).count();
        if buckets.len() + new(buckets) > self.capacity {
            if pruned.is_none_or(|at| now.saturating_duration_since(at).as_secs() >= 1) {
                *pruned = Some(now);
                buckets.retain(|key, b| {
                    let (burst, per_s) = self.allowance(key);
                    !b.is_full(now, per_s, burst)
                });
            }
            if buckets.len() + new(buckets) > self.capacity {
                return limited();
            }
        }
        let has_token = |key: &LimitKey| {
            let (burst, per_s) = self.allowance(key);
            buckets.get(key).is_none_or(|b| b.has_token(now, per_s, burst))
        };
        if !keys.iter().all(has_token) {
            return limited();
        }
        for key in &keys {
            let (burst, per_s) = self.allowance(key);
            buckets.entry(*key).or_insert_with(|| TokenBucket::full(burst, now)).take(now, per_s, burst);
        }
        Ok(())
    }

    /// Gives back the registration `take` took from `from`'s allowance, for one that was
    /// not made for want of the broker's room (nothing was created).
    fn give_back(&self, from: IpAddr, now: Instant) {
        let mut guard = self.table.lock().unwrap_or_else(|p| p.into_inner());
        for key in address_keys(from) {
            let (burst, per_s) = self.allowance(&key);
            if let Some(bucket) = guard.buckets.get_mut(&key) {
                bucket.give_back(now, per_s, burst);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

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

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    /// A `Login` of `user` with `password`, enrolling key `[7; 32]`'s device, signed over
    /// the transcript `b"t"`.
    fn login_request(user: &str, password: &str) -> Enroll {
        use ed25519_dalek::{Signer, SigningKey};
        let key = SigningKey::from_bytes(&[7; 32]);
        Enroll {
            user: user.into(),
            password: password.into(),
            device_name: "d".into(),
            public_key: bytes::Bytes::copy_from_slice(key.verifying_key().as_bytes()),
            signature: bytes::Bytes::copy_from_slice(&key.sign(b"t").to_bytes()),
        }
    }

    /// An enrollment with a key of small order (here the identity point, with the
    /// signature that verifies for it over any transcript under a non-strict check) is
    /// refused: before, it was enrolled, and anyone who learned the device's id signed
    /// in as it.
    #[test]
    fn an_enrollment_with_a_weak_key_is_refused() {
        use ed25519_dalek::Verifier;
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let mut signature = [0u8; 64];
        signature[..32].copy_from_slice(&identity);
        let weak = Enroll {
            public_key: bytes::Bytes::copy_from_slice(&identity),
            signature: bytes::Bytes::copy_from_slice(&signature),
            ..login_request("alice", "correct horse battery")
        };
        let key = VerifyingKey::from_bytes(&identity).unwrap();
        assert!(key.verify(b"any transcript", &Signature::from_bytes(&signature)).is_ok(), "a forgery without the fix");
        let refused = verify_enrollment(&weak, b"t").unwrap_err();
        assert_eq!(refused.code, ErrorCode::INVALID, "{refused:?}");
        assert!(verify_enrollment(&login_request("alice", "correct horse battery"), b"t").is_ok());
    }

    fn password_limiter(capacity: usize) -> FailureLimiter {
        FailureLimiter::new("failed passwords", capacity, AUTH_FAILURES_PER_ACCOUNT, AUTH_FAILURES_PER_ADDRESS)
    }

    #[test]
    fn failures_limit_per_account_and_expire_by_window() {
        let limiter = password_limiter(16);
        let keys = [LimitKey::Account(1), LimitKey::Address(ip(1))];
        for _ in 0..AUTH_FAILURES_PER_ACCOUNT {
            assert!(limiter.check(&keys, 1000).is_ok());
            limiter.record(&keys, 1000).unwrap();
        }
        assert_eq!(limiter.check(&keys, 1000).unwrap_err().code, ErrorCode::RATE_LIMITED);
        // Attempts that passed the check together cannot count past the bound.
        assert_eq!(limiter.record(&keys, 1000).unwrap_err().code, ErrorCode::RATE_LIMITED);
        assert!(limiter.table.lock().unwrap().windows.values().all(|w| w.count == AUTH_FAILURES_PER_ACCOUNT));
        // Another account from the same address is still allowed (address limit is higher).
        assert!(limiter.check(&[LimitKey::Account(2), LimitKey::Address(ip(1))], 1000).is_ok());
        // An expired window no longer counts.
        assert!(limiter.check(&keys, 1000 + AUTH_FAILURE_WINDOW_MS).is_ok());
    }

    #[test]
    fn a_full_failure_table_refuses_what_it_cannot_count_and_keeps_every_limit() {
        let limiter = password_limiter(4);
        let target = [LimitKey::Account(1), LimitKey::Address(ip(1))];
        for _ in 0..AUTH_FAILURES_PER_ACCOUNT {
            limiter.record(&target, 0).unwrap();
        }
        // Two more keys fill the table.
        limiter.record(&[LimitKey::Address(ip(2)), LimitKey::Address(ip(3))], 0).unwrap();
        // A guess from a new address at the targeted account: refused, not uncounted.
        let fresh = [LimitKey::Account(1), LimitKey::Address(ip(4))];
        assert_eq!(limiter.record(&fresh, 10).unwrap_err().code, ErrorCode::RATE_LIMITED);
        assert_eq!(limiter.check(&fresh, 10).unwrap_err().code, ErrorCode::RATE_LIMITED, "still limited");
        // New addresses trying many other names cannot push the target out.
        for a in 5..50 {
            assert!(limiter.record(&[LimitKey::Address(ip(a))], 20).is_err());
        }
        assert_eq!(limiter.check(&target, 30).unwrap_err().code, ErrorCode::RATE_LIMITED);
        // Keys already tracked keep counting.
        limiter.record(&[LimitKey::Address(ip(2))], 40).unwrap();
        // Once the windows expire there is room again.
        let later = AUTH_FAILURE_WINDOW_MS + 100;
        limiter.record(&fresh, later).unwrap();
        assert!(limiter.check(&target, later).is_ok());
    }

    #[test]
    fn sources_group_ipv6_by_network() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source(a), source(b));
        assert_ne!(source(a), source(other));
        assert_eq!(source("::ffff:10.0.0.1".parse().unwrap()), IpAddr::from([10, 0, 0, 1]));
        assert_eq!(source(ip(9)), ip(9));
        // Networks: an IPv6 source's /48, an IPv4 address itself.
        assert_eq!(network(source(a)), network(source(other)));
        assert_ne!(network(source(a)), network(source("2001:db8:2::1".parse().unwrap())));
        assert_eq!(network(source(ip(9))), ip(9));
        assert_ne!(network(ip(9)), network(ip(10)));
    }

    #[test]
    fn registrations_take_a_burst_per_address_then_the_rate() {
        let limiter = RegistrationLimiter::new(2, 1000, 2);
        let start = Instant::now();
        assert!(limiter.take(ip(1), start).is_ok());
        assert!(limiter.take(ip(1), start).is_ok());
        assert_eq!(limiter.take(ip(1), start).unwrap_err().code, ErrorCode::RATE_LIMITED);
        assert!(limiter.take(ip(2), start).is_ok(), "another address has its own allowance");
        // The table is full: a third address waits until an allowance has refilled.
        assert!(limiter.take(ip(3), start).is_err());
        let later = start + Duration::from_secs(2);
        assert!(limiter.take(ip(1), later).is_ok(), "refilled");
        assert!(limiter.take(ip(3), later + Duration::from_secs(2)).is_ok());
    }

    /// The `n`th /64 of the IPv6 /48 `site`.
    fn v6(site: u16, n: u16) -> IpAddr {
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, site, n, 0, 0, 0, 1))
    }

    /// A /48's /64 sources share the /48's allowance (`SOURCES_PER_NETWORK` sources'
    /// worth). Before, each /64 had its own and nothing else: a /48 (65,536 of them)
    /// kept the password pool busy for everyone.
    #[test]
    fn the_sources_of_one_ipv6_site_share_its_allowance() {
        let per_site = (2 * SOURCES_PER_NETWORK) as u16;
        let passwords = FailureLimiter::new("failed passwords", 1000, 10, 2);
        for n in 0..per_site {
            let keys = address_keys(v6(1, n / 2));
            assert!(passwords.check(&keys, 0).is_ok() && passwords.record(&keys, 0).is_ok(), "failure {n}");
        }
        let fresh = address_keys(v6(1, 999));
        assert_eq!(passwords.check(&fresh, 0).unwrap_err().code, ErrorCode::RATE_LIMITED, "a fresh /64 of the site");
        assert!(passwords.check(&address_keys(v6(2, 0)), 0).is_ok(), "another site");
        assert_eq!(address_keys(ip(9)), vec![LimitKey::Address(ip(9))], "IPv4: the address alone");

        let registrations = RegistrationLimiter::new(1, 3_600_000, 1000);
        let now = Instant::now();
        for n in 0..SOURCES_PER_NETWORK as u16 {
            assert!(registrations.take(v6(1, n), now).is_ok(), "source {n}");
        }
        assert!(registrations.take(v6(1, 999), now).is_err(), "the site's burst is spent");
        assert!(registrations.take(v6(2, 0), now).is_ok(), "another site");
        // A source refused for its site's allowance spent none of its own.
        let registrations = RegistrationLimiter::new(2, 3_600_000, 1000);
        for n in 0..2 * SOURCES_PER_NETWORK as u16 {
            assert!(registrations.take(v6(3, n), now).is_ok());
        }
        assert!(registrations.take(v6(3, 999), now).is_err());
        let later = now + Duration::from_secs(3_600 / u64::from(SOURCES_PER_NETWORK));
        assert!(registrations.take(v6(3, 999), later).is_ok(), "the site refilled one");
    }

    #[tokio::test]
    async fn the_password_queue_is_bounded_and_its_waiters_can_leave() {
        let params = argon2::Params::new(8, 1, 1, None).unwrap();
        let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let pool = Argon2Pool::new(argon, 2, true).unwrap();
        // Clients from different sources (one source may hold only a share).
        let client = |n: u8| pool.turn(Some(ip(n)));
        let running: Vec<Turn> = (0..ARGON2_CONCURRENCY as u8).map(|n| client(n).unwrap()).collect();
        assert!(running.iter().all(|t| matches!(t.place, Place::Now(_))));
        let queued = [client(10).unwrap(), client(11).unwrap()];
        assert_eq!(client(12).err().unwrap().code, ErrorCode::OVERLOADED);
        // An operator's turn queues all the same: a queue full of clients' checks
        // refused `user add` and `user passwd` (an attacker review).
        let operator = pool.turn(None).unwrap();
        assert!(matches!(operator.place, Place::Queued(_)));
        drop(operator);
        // A waiter that gives up makes room.
        let [first, second] = queued;
        drop(first);
        let third = client(13).unwrap();
        drop(running);
        // The queued ones run once slots free up.
        assert_eq!(pool.run(second, |_| 1).await.unwrap(), 1);
        assert_eq!(pool.run(third, |_| 2).await.unwrap(), 2);
        assert!(matches!(pool.turn(None).unwrap().place, Place::Now(_)));
    }

    /// One source holds at most a quarter of the pool's turns (two slots and a queue of
    /// ten: three), an IPv6 site all its /64s together; the others stay for everyone
    /// else, and a share comes back when its hash ends, not when it leaves the queue.
    /// Before, one address logging in to its own account in a loop (a right password is
    /// never counted) held every turn, and every other login and registration was
    /// refused `OVERLOADED`.
    #[tokio::test]
    async fn one_source_holds_at_most_a_quarter_of_the_password_turns() {
        let params = argon2::Params::new(8, 1, 1, None).unwrap();
        let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let pool = Argon2Pool::new(argon, 10, false).unwrap();
        let share_refused = |e: ErrorBody| e.code == ErrorCode::OVERLOADED && e.message.contains("from this address");
        let mut greedy: Vec<Turn> = (0..3).map(|_| pool.turn(Some(ip(1))).unwrap()).collect();
        assert!(share_refused(pool.turn(Some(ip(1))).err().unwrap()));
        // An IPv6 site's /64s share one site's quarter; the pool itself has room.
        let site = |host: u16| -> IpAddr { std::net::Ipv6Addr::new(0x2001, 0xdb8, 7, host, 0, 0, 0, 1).into() };
        let v6: Vec<Turn> = (0..3).map(|i| pool.turn(Some(site(i))).unwrap()).collect();
        assert!(share_refused(pool.turn(Some(site(99))).err().unwrap()));
        let others: Vec<Turn> = (2..5).map(|i| pool.turn(Some(ip(i))).unwrap()).collect();
        let more: Vec<Turn> = (0..3).map(|_| pool.turn(Some(ip(5))).unwrap()).collect();
        let full = pool.turn(Some(ip(6))).err().unwrap();
        assert_eq!(full.code, ErrorCode::OVERLOADED);
        assert!(!share_refused(full), "the pool itself is full");
        drop((v6, others, more));
        // A queued turn keeps its share while it waits and while it hashes.
        let held = |source| pool.shares.held.lock().unwrap().held(source);
        let queued = greedy.pop().unwrap();
        assert!(matches!(queued.place, Place::Queued(_)));
        greedy.pop();
        let slot = pool.slot(queued).await.unwrap();
        assert_eq!(held(ip(1)), 2, "given back when it left the queue");
        assert_eq!(pool.run_holding(slot, |_| 1).await.unwrap(), 1);
        assert_eq!(held(ip(1)), 1, "not given back when its hash ended");
        drop(greedy);
        assert_eq!(pool.shares.held.lock().unwrap().users(), 0, "only sources holding a turn are kept");
    }

    /// Password hashes run under `SCHED_IDLE` when the runtime's threads run under
    /// `SCHED_BATCH` (the default), so any broker thread woken on their core preempts
    /// them; under `normal` they keep the policy the broker started with (on a shared
    /// host an idle-policy hash would wait for every other process). Before, they ran on
    /// the runtime's blocking pool, under the runtime's policy.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn password_hashes_run_below_the_message_path_on_cores_of_its_own() {
        use crate::config::Scheduling;
        let started_as = crate::sched::kernel_policy_of_this_thread();
        for (scheduling, hashed_under) in [(Scheduling::Batch, libc::SCHED_IDLE), (Scheduling::Normal, started_as)] {
            let dir = tempfile::tempdir().unwrap();
            let config = Config { runtime_scheduling: scheduling, ..Config::ephemeral(dir.path()) };
            let auth = Auth::new(crate::open_store(&config).unwrap(), &config).unwrap();
            for _ in 0..2 * ARGON2_CONCURRENCY {
                let turn = auth.argon.turn(None).unwrap();
                let policy = auth.argon.run(turn, |_| crate::sched::kernel_policy_of_this_thread()).await.unwrap();
                assert_eq!(policy, hashed_under, "{scheduling:?}");
            }
        }
        assert_eq!(crate::sched::kernel_policy_of_this_thread(), started_as, "the caller's own policy is untouched");
    }

    /// A wrong password is counted once its hash holds a slot: a login that queues and
    /// leaves counts nothing (before, it was counted on entering the queue, so peers
    /// that hung up could fill the failure table, and spend a name's allowance, at the
    /// speed of handshakes with no hash done).
    #[tokio::test]
    async fn a_login_that_leaves_the_password_queue_counts_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::open_store(&Config::ephemeral(dir.path())).unwrap();
        let auth = Auth::new(store, &Config::ephemeral(dir.path())).unwrap();
        let login = login_request("nobody", "a wrong password");
        let counted = || auth.passwords.table.lock().unwrap().windows.values().map(|w| w.count).collect::<Vec<_>>();
        let busy: Vec<Turn> = (0..ARGON2_CONCURRENCY).map(|_| auth.argon.turn(None).unwrap()).collect();
        let queued = tokio::time::timeout(Duration::from_millis(50), auth.check_login(&login, b"t", ip(1))).await;
        assert!(queued.is_err(), "waits for a slot");
        assert_eq!(counted(), Vec::<u32>::new(), "the login that left was counted");
        drop(busy);
        let e = auth.check_login(&login, b"t", ip(1)).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::AUTH_FAILED);
        assert_eq!(counted(), [1, 1], "the name and the address, once each");
    }

    /// A right password spends its account's allowance of logins, from any address:
    /// past `LOGINS_PER_ACCOUNT` a window, a login to it is refused before its password
    /// is hashed. Before, a right password was never counted, so whoever knew one could
    /// have the broker hash it for good (one address is held to its share of the pool;
    /// many were not). Other accounts are not affected.
    #[tokio::test]
    async fn right_passwords_are_limited_per_account() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::ephemeral(dir.path());
        let auth = Auth::new(crate::open_store(&config).unwrap(), &config).unwrap();
        let login = |user: &str| login_request(user, "correct horse battery");
        for name in ["alice", "bob"] {
            auth.add_user(name, "correct horse battery").await.unwrap();
        }
        for i in 0..LOGINS_PER_ACCOUNT {
            auth.check_login(&login("alice"), b"t", ip(1 + (i % 200) as u8)).await.unwrap();
        }
        // Refused without a hash: with every hashing slot held, it does not wait for one.
        let busy: Vec<Turn> = (0..ARGON2_CONCURRENCY).map(|_| auth.argon.turn(None).unwrap()).collect();
        let again = login("alice");
        let refused = tokio::time::timeout(Duration::from_millis(500), auth.check_login(&again, b"t", ip(250)));
        let refused = refused.await.expect("waited for a hash").unwrap_err();
        drop(busy);
        assert_eq!(refused.code, ErrorCode::RATE_LIMITED);
        assert_eq!(refused.message, too_many().message, "the answer to a name guessed ten times wrong");
        auth.check_login(&login("bob"), b"t", ip(250)).await.unwrap();
    }

    /// A login made under an argon2 cost the operator has changed since stores its
    /// password hashed under the new one (before, the old hash stayed, and a wrong
    /// password's time told such accounts from names nobody has, checked against a
    /// decoy made under the new cost). A login under the broker's cost changes nothing.
    #[tokio::test]
    async fn a_login_hashes_its_password_again_under_a_changed_cost() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::ephemeral(dir.path());
        let store = crate::open_store(&config).unwrap();
        let before = Auth::new(store.clone(), &config).unwrap();
        let user = before.add_user("alice", "correct horse battery").await.unwrap();
        let old = store.user(user).unwrap().unwrap().password_hash;
        let mut changed = config.clone();
        changed.argon2_memory_kib = 2 * config.argon2_memory_kib;
        changed.argon2_iterations = config.argon2_iterations + 1;
        let after = Auth::new(store.clone(), &changed).unwrap();
        let login = login_request("alice", "correct horse battery");
        let (_, _, verified) = after.check_login(&login, b"t", ip(1)).await.unwrap();
        let stored = store.user(user).unwrap().unwrap().password_hash;
        assert_ne!(stored, old, "hashed again");
        assert_eq!(verified, stored, "the enrollment compares against the new hash");
        let cost = |phc: &str| argon2::Params::try_from(&PasswordHash::new(phc).unwrap()).unwrap();
        assert_eq!(
            (cost(&stored).m_cost(), cost(&stored).t_cost()),
            (changed.argon2_memory_kib, changed.argon2_iterations)
        );
        after.enroll(user, "d", [7; 32], Vec::new(), verified, None).await.unwrap();
        // The same password goes on working, and a login under the same cost again
        // leaves the hash as it is.
        let (_, _, again) = after.check_login(&login, b"t", ip(1)).await.unwrap();
        assert_eq!(again, stored);
        assert_eq!(store.user(user).unwrap().unwrap().password_hash, stored);
    }

    #[tokio::test]
    async fn names_that_cannot_exist_never_become_keys() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::ephemeral(dir.path());
        config.registration_open = true;
        let store = crate::open_store(&config).unwrap();
        let auth = Auth::new(store, &config).unwrap();
        let long = "x".repeat(4000);
        for name in [long.as_str(), "nobody", "Bad Name"] {
            let e = auth.authenticate(name, 1, &[0; 64], b"t", ip(1)).unwrap_err();
            assert_eq!(e.code, ErrorCode::AUTH_FAILED);
        }
        let keys: Vec<LimitKey> = auth.signatures.table.lock().unwrap().windows.keys().copied().collect();
        assert_eq!(keys, vec![LimitKey::Address(ip(1))], "only the address is counted");
        assert!(auth.passwords.table.lock().unwrap().windows.is_empty(), "signatures never count as passwords");
    }

    #[test]
    fn labels() {
        #[track_caller]
        fn check(label: &str, ok: bool) {
            let points: Vec<String> = label.chars().map(|c| format!("U+{:04X}", u32::from(c))).collect();
            assert_eq!(check_label(label).is_ok(), ok, "{label:?} ({})", points.join(" "));
        }
        for good in [
            "laptop",
            "Alice's phone",
            "a b",
            "équipe",
            "团队",
            "Ђорђе",
            "עברית",
            "مرحبا",
            "می\u{200C}خواهم",
            "👩\u{200D}💻 dev",
            "🏳\u{FE0F}\u{200D}🌈",
            "👍🏽",
            "x\u{0301}",
            &"x".repeat(64),
        ] {
            check(good, true);
        }
        for bad in [
            "",
            &"x".repeat(65),
            "\t",
            "a\nb",
            "a\u{7f}",
            "pay\u{202E}fdp.exe",
            "\u{202A}x",
            "\u{202B}x",
            "x\u{202C}",
            "\u{202D}x",
            "\u{2066}x",
            "x\u{2067}",
            "\u{2068}x",
            "x\u{2069}",
            "\u{200E}x",
            "x\u{200F}",
            "a\u{061C}b",
            "a\u{2028}b",
            "a\u{2029}b",
            " ",
            "   ",
            "\u{3000}",
            "\u{A0}",
            "\u{200B}",
            "a\u{200B}b",
            "\u{FEFF}x",
            "x\u{AD}y",
            "a\u{2060}b",
            "a\u{2061}b",
            "\u{200D}",
            " \u{200D} ",
            "\u{200D}x",
            "x\u{200D}",
            "x\u{200C}",
            "a \u{200D}b",
            "\u{FE0F}",
            " \u{FE0F}",
            "\u{3164}",
            "a\u{3164}b",
            "\u{115F}",
            "\u{FFA0}",
            "\u{2800}",
            "a\u{034F}b",
            "\u{180E}",
            "x\u{E0041}",
            "\u{E0001}",
            "a\u{FFF9}b",
            "\u{FDD0}",
            "a\u{FFFF}",
        ] {
            check(bad, false);
        }
    }
}
