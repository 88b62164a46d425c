//! `sb`: the Switchboard command line client.
//!
//! State (the device key and how to reach the broker) lives in `$SWITCHBOARD_HOME`
//! (default `~/.config/switchboard`) as `state.json`, readable only by its owner.
//! With `--json` every command prints one JSON object per line.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use serde::{Deserialize, Serialize};
use serde_json::json;
use switchboard_client::{Client, Connector, Identity, Trust, hex};
use switchboard_protocol::{
    Body, ConvId, ConversationKind, ConversationSummary, Entry, Event, Page, Role, Seq, UserId,
};

#[derive(Parser)]
#[command(name = "sb", version, about = "Switchboard command line client")]
struct Cli {
    /// Broker address (host:port).
    #[arg(long, global = true, env = "SWITCHBOARD_SERVER")]
    server: Option<String>,
    /// Trust this PEM certificate (e.g. the broker's switchboard-data/cert.pem).
    #[arg(long, global = true, env = "SWITCHBOARD_CA")]
    ca: Option<PathBuf>,
    /// Trust exactly the certificate with this SHA-256 (hex, as the broker prints it).
    #[arg(long, global = true, env = "SWITCHBOARD_PIN")]
    pin: Option<String>,
    /// Print one JSON object per line.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create an account and enroll this device (password: SWITCHBOARD_PASSWORD or prompt).
    Register { name: String },
    /// Enroll this device into an existing account.
    Login { name: String },
    /// Conversations.
    Conv {
        #[command(subcommand)]
        command: ConvCommand,
    },
    /// Send a text message.
    Send { conv: ConvId, text: String },
    /// Replace the text of one of my messages.
    Edit { conv: ConvId, seq: Seq, text: String },
    /// Delete one of my messages.
    Delete { conv: ConvId, seq: Seq },
    /// Show history (newest page by default).
    History {
        conv: ConvId,
        /// Entries before this seq.
        #[arg(long, conflicts_with = "after")]
        before: Option<Seq>,
        /// Entries after this seq.
        #[arg(long)]
        after: Option<Seq>,
        /// Page size (at most 200).
        #[arg(long, default_value_t = 50)]
        limit: u16,
    },
    /// Print events as they arrive, until interrupted.
    Tail,
    /// My devices.
    Devices {
        #[command(subcommand)]
        command: Option<DeviceCommand>,
    },
}

#[derive(Subcommand)]
enum ConvCommand {
    /// Create a conversation: one user and no title makes a direct conversation.
    Create {
        /// Group title (makes a group even with one other user).
        #[arg(long)]
        title: Option<String>,
        /// Other members.
        #[arg(required = true)]
        users: Vec<String>,
    },
    /// List my conversations.
    List,
    /// List the members of a conversation.
    Members { conv: ConvId },
    /// Add users to a group.
    Add {
        conv: ConvId,
        users: Vec<String>,
        /// Make them admins.
        #[arg(long)]
        admin: bool,
    },
    /// Remove a member (by user id) from a group.
    Remove { conv: ConvId, user: UserId },
    /// Leave a group.
    Leave { conv: ConvId },
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// List devices (the default).
    List,
    /// Revoke a device by id.
    Revoke { device: u64 },
}

/// What `sb` remembers between runs.
#[derive(Serialize, Deserialize, Default)]
struct State {
    server: Option<String>,
    ca: Option<PathBuf>,
    pin: Option<String>,
    identity: Option<Identity>,
}

fn main() {
    let cli = Cli::parse();
    let json = cli.json;
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| runtime.block_on(run(cli)));
    if let Err(e) = result {
        let code = e.downcast_ref::<switchboard_client::ClientError>().and_then(|c| c.code());
        if json {
            let (name, number) = code.map_or(("ERROR", None), |c| (c.name(), Some(c.0)));
            println!("{}", json!({"error": name, "code": number, "message": format!("{e:#}")}));
        }
        eprintln!("sb: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let home = home_dir()?;
    let mut state = load_state(&home)?;
    // Flags win and are remembered for the next command.
    if cli.server.is_some() {
        state.server = cli.server.clone();
    }
    if cli.ca.is_some() {
        state.ca = cli.ca.clone().map(|p| std::path::absolute(&p).unwrap_or(p));
        state.pin = None;
    }
    if cli.pin.is_some() {
        state.pin = cli.pin.clone();
        state.ca = None;
    }
    let out = Out { json: cli.json };
    let connector = connector(&state).await?;
    match cli.command {
        Command::Register { name } | Command::Login { name }
            if state.identity.as_ref().is_some_and(|i| i.user != name) =>
        {
            bail!(
                "this home already holds a device of {:?}; use another SWITCHBOARD_HOME",
                state.identity.map(|i| i.user)
            )
        }
        command @ (Command::Register { .. } | Command::Login { .. }) => {
            let (register, name) = match command {
                Command::Register { name } => (true, name),
                Command::Login { name } => (false, name),
                _ => unreachable!("matched above"),
            };
            let password = password(&name, register)?;
            let (_client, identity) = if register {
                connector.register(&name, &password, &device_name()).await?
            } else {
                connector.login(&name, &password, &device_name()).await?
            };
            let (event, verb) = if register { ("registered", "registered") } else { ("logged_in", "logged in as") };
            out.line(
                json!({"event": event, "user": name, "user_id": identity.user_id, "device_id": identity.device_id}),
                || format!("{verb} {name} (user {}, device {})", identity.user_id, identity.device_id),
            );
            state.identity = Some(identity);
            save_state(&home, &state)?;
        }
        command => {
            let identity =
                state.identity.as_ref().context("no device here yet: run `sb register NAME` or `sb login NAME`")?;
            save_state(&home, &state)?;
            let client = connector.connect(identity).await?;
            authed(&client, &out, command).await?;
        }
    }
    connector.endpoint().wait_idle().await;
    Ok(())
}

async fn authed(client: &Client, out: &Out, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Register { .. } | Command::Login { .. } => unreachable!("handled before connecting"),
        Command::Conv { command } => match command {
            ConvCommand::Create { title, users } => {
                let conv = match (title, users.as_slice()) {
                    (None, [peer]) => client.create_direct(peer).await?,
                    (title, _) => client.create_group(title.as_deref().unwrap_or("group"), &users).await?,
                };
                out.conversation(&conv);
            }
            ConvCommand::List => {
                for conv in client.conversations().await? {
                    out.conversation(&conv);
                }
            }
            ConvCommand::Members { conv } => {
                for m in client.members(conv).await? {
                    out.line(
                        json!({"user_id": m.user_id, "name": m.name, "role": format!("{:?}", m.role).to_lowercase()}),
                        || format!("{:>6}  {:<20} {:?}", m.user_id, m.name, m.role),
                    );
                }
            }
            ConvCommand::Add { conv, users, admin } => {
                let seq = client.add_members(conv, &users, if admin { Role::Admin } else { Role::Member }).await?;
                out.seq(conv, seq);
            }
            ConvCommand::Remove { conv, user } => out.seq(conv, client.remove_member(conv, user).await?),
            ConvCommand::Leave { conv } => out.seq(conv, client.leave(conv).await?),
        },
        Command::Send { conv, text } => out.seq(conv, client.send(conv, &text).await?),
        Command::Edit { conv, seq, text } => out.seq(conv, client.edit(conv, seq, &text).await?),
        Command::Delete { conv, seq } => out.seq(conv, client.delete(conv, seq).await?),
        Command::History { conv, before, after, limit } => {
            let page = match (before, after) {
                (Some(b), _) => Page::Before(b),
                (_, Some(a)) => Page::After(a),
                _ => Page::Latest,
            };
            let (entries, _) = client.history(conv, page, limit).await?;
            let mut names = Names::default();
            for e in entries {
                out.entry(&e, &names.of(client, e.conv, e.sender).await);
            }
        }
        Command::Tail => {
            let mut events = client.events().context("event stream already taken")?;
            let mut names = Names::default();
            loop {
                tokio::select! {
                    event = events.next() => match event {
                        Some(Event::Entry(e)) => {
                            let name = names.of(client, e.conv, e.sender).await;
                            out.entry(&e, &name);
                        }
                        None => bail!("connection closed: {}", client.closed().await),
                    },
                    _ = tokio::signal::ctrl_c() => break,
                }
            }
        }
        Command::Devices { command } => match command.unwrap_or(DeviceCommand::List) {
            DeviceCommand::List => {
                for d in client.devices().await? {
                    out.line(json!({"device_id": d.device_id, "name": d.name, "enrolled_ms": d.enrolled_ms, "current": d.current}), || {
                        format!("{:>6}  {:<24}{}", d.device_id, d.name, if d.current { "  (this device)" } else { "" })
                    });
                }
            }
            DeviceCommand::Revoke { device } => {
                client.revoke_device(device).await?;
                out.line(json!({"event": "revoked", "device_id": device}), || format!("revoked device {device}"));
            }
        },
    }
    client.close();
    Ok(())
}

/// Printing in human or JSON form.
struct Out {
    json: bool,
}

impl Out {
    fn line(&self, value: serde_json::Value, human: impl FnOnce() -> String) {
        if self.json {
            println!("{value}");
        } else {
            println!("{}", human());
        }
    }

    fn seq(&self, conv: ConvId, seq: Seq) {
        self.line(json!({"conv": conv, "seq": seq}), || format!("conv {conv} seq {seq}"));
    }

    fn conversation(&self, c: &ConversationSummary) {
        let kind = format!("{:?}", c.kind).to_lowercase();
        let role = format!("{:?}", c.my_role).to_lowercase();
        self.line(
            json!({"conv": c.id, "kind": kind, "title": c.title, "last_seq": c.last_seq, "members": c.member_count, "role": role}),
            || format!("{:>6}  {:<7} {:<24} last seq {:<8} {} members", c.id, kind, c.title, c.last_seq, c.member_count),
        );
    }

    fn entry(&self, e: &Entry, sender: &str) {
        let (kind, text) = describe(&e.body);
        self.line(
            json!({
                "conv": e.conv, "seq": e.seq, "sender": e.sender, "sender_name": sender,
                "sender_device": e.sender_device, "client_id": hex(&e.client_id), "at_ms": e.at_ms,
                "kind": kind, "body": serde_json::to_value(&e.body).unwrap_or_default(), "text": text,
            }),
            || format!("[{} #{}] {}: {}", e.conv, e.seq, sender, text),
        );
    }
}

fn describe(body: &Body) -> (&'static str, String) {
    match body {
        Body::Text { text, edited } => ("text", if *edited { format!("{text} (edited)") } else { text.clone() }),
        Body::Tombstone => ("tombstone", "(deleted)".into()),
        Body::Edit { target, text } => ("edit", format!("edited #{target}: {text}")),
        Body::Delete { target } => ("delete", format!("deleted #{target}")),
        Body::Created { kind: ConversationKind::Direct, .. } => ("created", "started the conversation".into()),
        Body::Created { title, members, .. } => {
            ("created", format!("created {title:?} with {} members", members.len()))
        }
        Body::MembersAdded { members } => (
            "members_added",
            format!("added {}", members.iter().map(|(u, _)| u.to_string()).collect::<Vec<_>>().join(", ")),
        ),
        Body::MemberRemoved { user } => ("member_removed", format!("removed {user}")),
        Body::MemberLeft => ("member_left", "left".into()),
        Body::Redacted { target } => ("redacted", format!("(edit of deleted #{target})")),
    }
}

/// User names per conversation, fetched once per conversation.
#[derive(Default)]
struct Names(HashMap<ConvId, HashMap<UserId, String>>);

impl Names {
    async fn of(&mut self, client: &Client, conv: ConvId, user: UserId) -> String {
        if !self.0.get(&conv).is_some_and(|m| m.contains_key(&user))
            && let Ok(members) = client.members(conv).await
        {
            self.0.insert(conv, members.into_iter().map(|m| (m.user_id, m.name)).collect());
        }
        self.0.get(&conv).and_then(|m| m.get(&user)).cloned().unwrap_or_else(|| format!("user#{user}"))
    }
}

async fn connector(state: &State) -> anyhow::Result<Connector> {
    let server = state.server.clone().unwrap_or_else(|| "127.0.0.1:4433".into());
    let addr: SocketAddr = tokio::net::lookup_host(&server)
        .await
        .with_context(|| format!("resolving {server}"))?
        .next()
        .with_context(|| format!("no address for {server}"))?;
    let host = server.rsplit_once(':').map_or(server.as_str(), |(h, _)| h).trim_matches(['[', ']']);
    // The generated certificate names localhost and the loopback addresses.
    let name = if host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback()) { "localhost" } else { host };
    let trust = match (&state.pin, &state.ca) {
        (Some(pin), _) => Trust::Pin(pin.clone()),
        (None, Some(ca)) => Trust::CaFile(ca.clone()),
        (None, None) if Path::new("switchboard-data/cert.pem").exists() => {
            Trust::CaFile("switchboard-data/cert.pem".into())
        }
        (None, None) => bail!("pass --ca FILE or --pin SHA256 (the broker prints both at start)"),
    };
    Ok(Connector::new(addr, name, trust)?)
}

fn home_dir() -> anyhow::Result<PathBuf> {
    if let Some(h) = std::env::var_os("SWITCHBOARD_HOME") {
        return Ok(PathBuf::from(h));
    }
    let home = std::env::var_os("HOME").context("set SWITCHBOARD_HOME or HOME")?;
    Ok(PathBuf::from(home).join(".config").join("switchboard"))
}

fn load_state(home: &Path) -> anyhow::Result<State> {
    let path = home.join("state.json");
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| format!("reading {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn save_state(home: &Path, state: &State) -> anyhow::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(home)?;
    let tmp = home.join("state.json.tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(state)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, home.join("state.json"))?;
    Ok(())
}

fn password(name: &str, confirm: bool) -> anyhow::Result<String> {
    if let Ok(p) = std::env::var("SWITCHBOARD_PASSWORD") {
        return Ok(p);
    }
    let read = |prompt: &str| -> anyhow::Result<String> { Ok(rpassword::prompt_password(prompt)?) };
    let p = read(&format!("password for {name}: "))?;
    if confirm && read("again: ")? != p {
        bail!("passwords differ");
    }
    Ok(p)
}

fn device_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_owned()).unwrap_or_default();
    let name = if host.is_empty() { "sb".to_owned() } else { format!("sb@{host}") };
    name.chars().filter(|c| !c.is_control()).take(64).collect()
}
