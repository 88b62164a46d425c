//! Accounts and devices end to end.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use switchboard_protocol::ErrorCode;
use switchboard_tests::TestBroker;

#[tokio::test]
async fn revoked_device_is_disconnected_and_cannot_return() {
    let tb = TestBroker::start().await;
    let (laptop, laptop_id) = tb.register("alice").await;
    let (phone, phone_id) = tb.login("alice").await;
    let devices = laptop.devices().await.unwrap();
    assert_eq!(devices.len(), 2);
    assert!(devices.iter().any(|d| d.device_id == laptop_id.device_id && d.current));
    laptop.revoke_device(phone_id.device_id).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(10), phone.closed()).await.unwrap();
    assert_eq!(closed.code(), Some(ErrorCode::DEVICE_REVOKED));
    let again = tb.connector().connect(&phone_id).await.err().unwrap();
    assert_eq!(again.code(), Some(ErrorCode::AUTH_FAILED));
    // The other device is unaffected, and can reconnect.
    laptop.ping().await.unwrap();
    tb.connector().connect(&laptop_id).await.unwrap().ping().await.unwrap();
    assert_eq!(laptop.devices().await.unwrap().len(), 1);
    // Another user's device cannot be revoked.
    let (bob, _) = tb.register("bob").await;
    assert_eq!(bob.revoke_device(laptop_id.device_id).await.unwrap_err().code(), Some(ErrorCode::NOT_FOUND));
}

#[tokio::test]
async fn registration_rules() {
    let tb = TestBroker::start().await;
    tb.register("alice").await;
    let taken = tb.connector().register("alice", tb.password, "d").await.err().unwrap();
    assert_eq!(taken.code(), Some(ErrorCode::CONFLICT));
    let bad_name = tb.connector().register("Alice Smith", tb.password, "d").await.err().unwrap();
    assert_eq!(bad_name.code(), Some(ErrorCode::INVALID));
    let short = tb.connector().register("carol", "short", "d").await.err().unwrap();
    assert_eq!(short.code(), Some(ErrorCode::INVALID));

    let closed = TestBroker::start_with(|c| c.registration_open = false).await;
    let refused = closed.connector().register("dave", closed.password, "d").await.err().unwrap();
    assert_eq!(refused.code(), Some(ErrorCode::REGISTRATION_CLOSED));
}

#[tokio::test]
async fn failed_logins_are_rate_limited() {
    let tb = TestBroker::start().await;
    tb.register("alice").await;
    let mut codes = Vec::new();
    for _ in 0..12 {
        let e = tb.connector().login("alice", "wrong password", "d").await.err().unwrap();
        codes.push(e.code().unwrap());
    }
    assert!(codes[..10].iter().all(|c| *c == ErrorCode::AUTH_FAILED), "{codes:?}");
    assert!(codes[10..].iter().all(|c| *c == ErrorCode::RATE_LIMITED), "{codes:?}");
    // Even the right password is refused while the account is limited.
    let e = tb.connector().login("alice", tb.password, "d").await.err().unwrap();
    assert_eq!(e.code(), Some(ErrorCode::RATE_LIMITED));
    // A different account is not affected.
    tb.register("bob").await;
    tb.login("bob").await;
}

#[tokio::test]
async fn signature_from_another_connection_does_not_verify() {
    // Authenticating requires the key: an identity with the right ids but another key fails.
    let tb = TestBroker::start().await;
    let (_c, mut id) = tb.register("alice").await;
    id.secret_key = "11".repeat(32);
    let e = tb.connector().connect(&id).await.err().unwrap();
    assert_eq!(e.code(), Some(ErrorCode::AUTH_FAILED));
}
