//! Operator commands (`switchboard user ...`, `switchboard device ...`) whether or not a
//! broker runs on the data dir. A running broker holds the store's lock, so it serves
//! the commands itself on a Unix socket in its data dir (`SOCKET`): the command line
//! asks there first (`request`) and opens the store on its own only when no broker
//! answers. Both ways run the same `execute`; with a broker running, a revoked device's
//! connections are closed at once (`DEVICE_REVOKED`), as a user's own `RevokeDevice`
//! does.
//!
//! The socket answers only the user the broker runs as (checked on each connection from
//! the kernel's peer credentials; others get a refusal saying so), and the command line
//! sends only to a broker running as its own user; at most `MAX_CONNECTIONS` at once,
//! one request each: `PROTOCOL` (4 bytes), then a `u32` little-endian length (at most
//! `REQUEST_MAX_BYTES`) and an `AdminRequest` in postcard, answered with a length and
//! an `AdminReply` (a shape kept across versions). A request of another protocol (a
//! command line of another version) is answered `UNSUPPORTED_VERSION`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use switchboard_protocol::{DeviceId, ErrorBody, ErrorCode};
use switchboard_storage::Store;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use crate::Shared;
use crate::auth::Auth;
use crate::catalog::no_user;

/// The socket's file name in the data dir.
pub const SOCKET: &str = "admin.sock";
/// The first four bytes of every request: the shape of `AdminRequest` this binary
/// speaks. Change it with `AdminRequest`. Before it was sent, requests began with
/// their length (at most `REQUEST_MAX_BYTES`), which never reads as a tag.
pub const PROTOCOL: [u8; 4] = *b"SBA1";
/// Longest request accepted, bytes (names and a password are far shorter).
pub const REQUEST_MAX_BYTES: u32 = 64 * 1024;
/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 2;
/// Time one exchange may take, both sides (a password hash and a durable write fit
/// many times over).
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);

/// One operator command. No `Debug`: two of them carry a password, which must not reach
/// a log.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum AdminRequest {
    /// Create an account without a device.
    UserAdd { name: String, password: String },
    /// Every account.
    UserList,
    /// Set an account's password; with `revoke_devices`, revoke all its devices too.
    UserPasswd { name: String, password: String, revoke_devices: bool },
    /// An account's devices.
    DeviceList { user: String },
    /// Revoke one device.
    DeviceRevoke { user: String, device: DeviceId },
    /// Disable an account (no device of it signs in; its connections close), or enable
    /// it again.
    UserDisable { name: String, disabled: bool },
}

/// The lines to print on success, or the failure with its stable code: `NOT_FOUND` (no
/// such user or device), `CONFLICT` (the name is taken), `INVALID` (a name or password
/// outside its rules), `OVERLOADED` (too many password checks under way), `FORBIDDEN`
/// (the socket's peer is not the broker's user), `INTERNAL` (the store failed). `exit_status` maps each to the command line's status.
pub type AdminReply = Result<Vec<String>, ErrorBody>;

/// The command line's exit status for a failure with `code`, stable for scripts: 3 no
/// such user or device, 4 the name is taken, 5 a name or password outside its rules, 6
/// too many password checks under way (run it again), 7 the running broker is of
/// another version (run the command with its binary), 1 anything else (the store, the
/// socket, the data dir; 2 is the command line's usage errors).
pub fn exit_status(code: ErrorCode) -> i32 {
    match code {
        ErrorCode::NOT_FOUND => 3,
        ErrorCode::CONFLICT => 4,
        ErrorCode::INVALID => 5,
        ErrorCode::OVERLOADED => 6,
        ErrorCode::UNSUPPORTED_VERSION => 7,
        _ => 1,
    }
}

/// A store failure, as the commands report it.
fn failed(e: impl std::fmt::Display) -> ErrorBody {
    ErrorBody::new(ErrorCode::INTERNAL, e.to_string())
}

/// What the commands work on: the store and its accounts, and with a broker running,
/// the broker (whose sessions a revoke closes).
pub struct Ops<'a> {
    /// The store.
    pub store: &'a Arc<Store>,
    /// Accounts and passwords.
    pub auth: &'a Auth,
    /// The running broker, when the command reached it.
    pub broker: Option<&'a Shared>,
}

/// Runs `request`.
pub async fn execute(ops: &Ops<'_>, request: AdminRequest) -> AdminReply {
    match request {
        AdminRequest::UserAdd { name, password } => {
            let id = ops.auth.add_user(&name, &password).await?;
            Ok(vec![format!("created user {name} (id {id})")])
        }
        AdminRequest::UserList => {
            let store = ops.store.clone();
            blocking(move || list_users(&store)).await
        }
        AdminRequest::UserPasswd { name, password, revoke_devices } => {
            // The password and the revocations are one write, and their sessions are
            // closed once it is durable, even if the exchange is cut short (its timeout):
            // it cannot leave the password set and some devices kept in the store, or
            // their sessions open (`catalog::to_the_end`).
            let closer = ops.broker.map(|shared| shared.users.closer());
            let (user, revoked) = ops.auth.set_password(&name, &password, revoke_devices, closer).await?;
            if !revoke_devices {
                return Ok(vec![format!(
                    "set a new password for {name} (its devices still work: --revoke-devices revokes them)"
                )]);
            }
            for &device in &revoked {
                tracing::info!(user, device, "device revoked by an operator's password reset");
            }
            let devices = if revoked.len() == 1 { "device" } else { "devices" };
            Ok(vec![format!("set a new password for {name} and revoked its {} {devices}", revoked.len())])
        }
        AdminRequest::UserDisable { name, disabled } => {
            let (user, _) = ops.store.user_by_name(&name).map_err(failed)?.ok_or_else(|| no_user(&name))?;
            let since = ops.store.disabled_since(user).map_err(failed)?;
            // A running broker's sessions of the account are closed once the write is
            // durable, even if this exchange is cut short (`catalog::to_the_end`).
            let (store, closer, known) = (ops.store.clone(), ops.broker.map(|b| b.users.closer()), name.clone());
            crate::catalog::to_the_end(async move {
                let set =
                    crate::catalog::catalog_write(&store, move |s| s.set_disabled(user, disabled, crate::now_ms()));
                let durable = set.await?.map_err(failed)?.ok_or_else(|| no_user(&known))?;
                durable.await.map_err(failed)?;
                if let (true, Some(closer)) = (disabled, closer) {
                    closer.disable(user);
                }
                Ok(())
            })
            .await?;
            if disabled {
                if let Some(since) = since {
                    return Ok(vec![format!("{name} was disabled already (since {})", utc(since))]);
                }
                tracing::info!(user, "account disabled by the operator");
                // With no broker running there were no connections to close (an operator
                // trial was told they were).
                let closed = if ops.broker.is_some() { " and its connections were closed" } else { "" };
                Ok(vec![format!("disabled {name}: its devices cannot sign in{closed}")])
            } else if since.is_none() {
                Ok(vec![format!("{name} was not disabled")])
            } else {
                tracing::info!(user, "account enabled by the operator");
                Ok(vec![format!("enabled {name} again")])
            }
        }
        AdminRequest::DeviceList { user } => {
            let store = ops.store.clone();
            blocking(move || list_devices(&store, &user)).await
        }
        AdminRequest::DeviceRevoke { user, device } => {
            let (id, _) = ops.store.user_by_name(&user).map_err(failed)?.ok_or_else(|| no_user(&user))?;
            if !revoke(ops, id, device).await? {
                return Err(ErrorBody::new(
                    ErrorCode::NOT_FOUND,
                    format!(
                        "{user} has no device {device} (or it was revoked already: `device list` shows those left)"
                    ),
                ));
            }
            Ok(vec![format!("revoked device {device} of {user}")])
        }
    }
}

/// Revokes `device` of `user`, durably; with a broker running, its connections are
/// closed too. Whether there was such a device.
async fn revoke(ops: &Ops<'_>, user: u64, device: DeviceId) -> Result<bool, ErrorBody> {
    match ops.broker {
        Some(shared) => match crate::catalog::revoke_device(shared, user, device, None).await {
            Ok(_) => Ok(true),
            Err(e) if e.code == ErrorCode::NOT_FOUND => Ok(false),
            Err(e) => Err(e),
        },
        None => match ops.store.remove_device(user, device).map_err(failed)? {
            Some(durable) => durable.await.map(|()| true).map_err(failed),
            None => Ok(false),
        },
    }
}

/// `f` on a blocking thread (a listing reads the whole table).
async fn blocking(f: impl FnOnce() -> AdminReply + Send + 'static) -> AdminReply {
    tokio::task::spawn_blocking(f).await.map_err(failed)?
}

/// One account a line: id, creation time (UTC), devices, name, and for a disabled one
/// `disabled since TIME` (tab-separated).
fn list_users(store: &Store) -> AdminReply {
    let mut lines = Vec::new();
    for (id, user) in store.users().map_err(failed)? {
        let devices = store.devices(id).map_err(failed)?.len();
        let mut line = format!("{id}\t{}\t{devices}\t{}", utc(user.created_ms), user.name);
        if let Some(since) = store.disabled_since(id).map_err(failed)? {
            line.push_str(&format!("\tdisabled since {}", utc(since)));
        }
        lines.push(line);
    }
    Ok(lines)
}

/// One device of `user` a line: id, enrollment time (UTC), confirmed or not, name.
fn list_devices(store: &Store, user: &str) -> AdminReply {
    let (id, _) = store.user_by_name(user).map_err(failed)?.ok_or_else(|| no_user(user))?;
    let unconfirmed = store.unconfirmed_devices(id).map_err(failed)?;
    let devices = store.devices(id).map_err(failed)?;
    Ok(devices
        .into_iter()
        .map(|(device, d)| {
            let state = if unconfirmed.contains(&device) { "unconfirmed" } else { "confirmed" };
            format!("{device}\t{}\t{state}\t{:?}", utc(d.enrolled_ms), d.name)
        })
        .collect())
}

/// `ms` since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ` (UTC).
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rest / 3600, rest % 3600 / 60, rest % 60)
}

/// The socket's path for `data_dir`.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET)
}

/// Binds the socket in `data_dir`, replacing one a crashed broker left (this broker holds
/// the store's lock, so no other serves this data dir), readable and writable by its
/// owner only.
pub fn bind(data_dir: &Path) -> std::io::Result<UnixListener> {
    let path = socket_path(data_dir);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves operator commands on `listener` until the broker is gone, or until this task
/// is aborted (`Broker::shutdown`), which aborts the exchanges in progress too: none can
/// keep the broker's state alive past its shutdown.
pub async fn serve(listener: UnixListener, shared: Weak<Shared>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let owner = rustix::process::geteuid().as_raw();
    let mut exchanges = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = exchanges.join_next() => continue,
        };
        let mut stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "admin socket: accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Beyond `MAX_CONNECTIONS`, a connection waits here (and the ones after it in
        // the listen backlog) for an exchange to end.
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let peer = stream.peer_cred().ok().map(|c| c.uid());
        let shared = shared.clone();
        exchanges.spawn(async move {
            let _slot = slot;
            let exchange = async {
                if peer != Some(owner) {
                    // Told why (a `sudo` or another account), not merely closed.
                    let refusal: AdminReply = Err(ErrorBody::new(
                        ErrorCode::FORBIDDEN,
                        format!(
                            "the admin socket answers only the user the broker runs as (uid {owner}); this is uid {}",
                            peer.map_or("unknown".to_owned(), |p| p.to_string())
                        ),
                    ));
                    return write_message(&mut stream, &refusal).await;
                }
                answer(stream, &shared).await
            };
            if tokio::time::timeout(EXCHANGE_TIMEOUT, exchange).await.is_err() {
                tracing::debug!("admin socket: an exchange timed out");
            }
        });
    }
}

/// Reads one request, runs it, writes its reply. The broker's state is held only from
/// the request on (a connection that sends nothing holds nothing).
async fn answer(mut stream: UnixStream, shared: &Weak<Shared>) -> std::io::Result<()> {
    let mut protocol = [0u8; 4];
    match stream.read_exact(&mut protocol).await {
        Ok(_) if protocol == PROTOCOL => {}
        Ok(_) => {
            let message = format!(
                "this broker (switchboard {}) speaks another operator protocol than the command: run the command with the binary the broker runs",
                env!("CARGO_PKG_VERSION")
            );
            let reply: AdminReply = Err(ErrorBody::new(ErrorCode::UNSUPPORTED_VERSION, &message));
            return write_message(&mut stream, &reply).await;
        }
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
        Err(e) => return Err(e),
    }
    let request: AdminRequest = match read_message(&mut stream, REQUEST_MAX_BYTES).await? {
        Some(request) => request,
        None => return Ok(()),
    };
    let Some(shared) = shared.upgrade() else { return Ok(()) };
    let ops = Ops { store: &shared.store, auth: &shared.auth, broker: Some(&shared) };
    let reply = execute(&ops, request).await;
    write_message(&mut stream, &reply).await
}

/// Longest reply read, bytes (a user list of millions of accounts fits).
pub const REPLY_MAX_BYTES: u32 = 256 * 1024 * 1024;

/// Asks the broker running on `data_dir` to run `request`. `None` when no broker listens
/// there (no socket, or one a stopped broker left): then the caller may open the store
/// itself. Any other failure to reach it (e.g. the socket belongs to another user) is an
/// error, not a reason to try the store (which that broker holds).
pub async fn request(data_dir: &Path, request: &AdminRequest) -> Option<std::io::Result<AdminReply>> {
    use std::io::ErrorKind;
    let mut stream = match UnixStream::connect(socket_path(data_dir)).await {
        Ok(stream) => stream,
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => return None,
        // Too long for a socket address (`sun_path`, 108 bytes): a broker could not
        // bind it either (it warned at start), so only the store can serve.
        Err(e) if e.kind() == ErrorKind::InvalidInput => return None,
        Err(e) if e.kind() == ErrorKind::PermissionDenied => {
            return Some(Err(std::io::Error::other(format!(
                "the admin socket {} belongs to the user the broker runs as: run the command as that user ({e})",
                socket_path(data_dir).display()
            ))));
        }
        Err(e) => return Some(Err(e)),
    };
    let exchange = async {
        // The password goes only to a broker running as this user.
        let me = rustix::process::geteuid().as_raw();
        let peer = stream.peer_cred()?.uid();
        if peer != me {
            return Err(std::io::Error::other(format!(
                "the admin socket is served by uid {peer}, not this user (uid {me}): run the command as the broker's user"
            )));
        }
        stream.write_all(&PROTOCOL).await?;
        write_message(&mut stream, request).await?;
        read_message(&mut stream, REPLY_MAX_BYTES).await?.ok_or_else(|| {
            std::io::Error::other(
                "the broker closed the admin socket without an answer: it stopped or failed during the command, which may have been carried out (`user list` or `device list` tells), or it is of an older version (run the command with the binary it runs)",
            )
        })
    };
    Some(match tokio::time::timeout(EXCHANGE_TIMEOUT, exchange).await {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::other("the broker did not answer on its admin socket in time")),
    })
}

async fn write_message<T: Serialize>(stream: &mut UnixStream, message: &T) -> std::io::Result<()> {
    let body = postcard::to_stdvec(message).map_err(std::io::Error::other)?;
    let len = u32::try_from(body.len()).map_err(std::io::Error::other)?;
    stream.write_all(&len.to_le_bytes()).await?;
    stream.write_all(&body).await?;
    stream.flush().await
}

/// A message of at most `max` bytes, or `None` if the peer closed before one began.
async fn read_message<T: serde::de::DeserializeOwned>(stream: &mut UnixStream, max: u32) -> std::io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len);
    if len > max {
        return Err(std::io::Error::other(format!("an admin message of {len} bytes, over {max}")));
    }
    let mut body = vec![0u8; len as usize];
    stream.read_exact(&mut body).await?;
    postcard::from_bytes(&body).map(Some).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A command line of another version (here one that sends no protocol tag, as before
    /// it existed) is told so, with its own reply shape, and the broker runs nothing.
    #[tokio::test]
    async fn a_request_of_another_protocol_is_answered_unsupported_version() {
        let (mut client, server) = UnixStream::pair().unwrap();
        let answered = tokio::spawn(async move { answer(server, &Weak::new()).await });
        write_message(&mut client, &AdminRequest::UserList).await.unwrap();
        let reply: AdminReply = read_message(&mut client, REPLY_MAX_BYTES).await.unwrap().unwrap();
        let refused = reply.unwrap_err();
        assert_eq!(refused.code, ErrorCode::UNSUPPORTED_VERSION, "{refused:?}");
        assert_eq!(exit_status(refused.code), 7);
        answered.await.unwrap().unwrap();
        // With the tag, the request is read (and, the broker gone, not answered).
        let (mut client, server) = UnixStream::pair().unwrap();
        let answered = tokio::spawn(async move { answer(server, &Weak::new()).await });
        client.write_all(&PROTOCOL).await.unwrap();
        write_message(&mut client, &AdminRequest::UserList).await.unwrap();
        answered.await.unwrap().unwrap();
        assert!(read_message::<AdminReply>(&mut client, REPLY_MAX_BYTES).await.unwrap().is_none());
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(1_700_000_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00Z");
    }
}
