//! Helpers for the end-to-end tests: a real broker on 127.0.0.1:0 with a temp data dir,
//! and clients that trust its generated certificate. Nothing here mocks our stack.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Duration;

use switchboard_broker::{Broker, Config};
use switchboard_client::{Client, Connector, Events, Identity, Trust};
use switchboard_protocol::{Entry, Event};

/// A broker and the temp dir it lives in.
pub struct TestBroker {
    /// The broker (None after `stop`).
    pub broker: Option<Broker>,
    /// Its data dir (kept across restarts).
    pub dir: tempfile::TempDir,
    /// Password used for every test account.
    pub password: &'static str,
}

impl TestBroker {
    /// Starts a broker with the test defaults.
    pub async fn start() -> TestBroker {
        Self::start_with(|_| {}).await
    }

    /// Starts a broker after letting the caller adjust the config.
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> TestBroker {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::ephemeral(dir.path().join("data"));
        adjust(&mut config);
        let broker = Broker::start(config).await.unwrap();
        TestBroker { broker: Some(broker), dir, password: "correct horse battery" }
    }

    /// The data dir.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A connector trusting the broker's certificate file.
    pub fn connector(&self) -> Connector {
        let b = self.broker.as_ref().unwrap();
        Connector::new(b.local_addr, "localhost", Trust::CaFile(b.cert_path.clone())).unwrap()
    }

    /// Registers `name` and returns its first device.
    pub async fn register(&self, name: &str) -> (Client, Identity) {
        self.connector().register(name, self.password, "test-device").await.unwrap()
    }

    /// Enrolls another device of `name`.
    pub async fn login(&self, name: &str) -> (Client, Identity) {
        self.connector().login(name, self.password, "another-device").await.unwrap()
    }

    /// Shuts the broker down cleanly.
    pub async fn stop(&mut self) {
        if let Some(b) = self.broker.take() {
            b.shutdown().await.unwrap();
        }
    }

    /// Restarts on the same data dir (new port).
    pub async fn restart(&mut self) {
        self.stop().await;
        let config = Config::ephemeral(self.data_dir());
        self.broker = Some(Broker::start(config).await.unwrap());
    }
}

/// Waits up to 10 s for the next entry event.
pub async fn next_entry(events: &mut Events) -> Entry {
    match tokio::time::timeout(Duration::from_secs(10), events.next()).await {
        Ok(Some(Event::Entry(e))) => e,
        other => panic!("expected an entry event, got {other:?}"),
    }
}

/// Asserts no event arrives within `ms`.
pub async fn no_event(events: &mut Events, ms: u64) {
    if let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(ms), events.next()).await {
        panic!("unexpected event {e:?}");
    }
}
