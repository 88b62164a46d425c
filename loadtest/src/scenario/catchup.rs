//! `catchup`: a device that was offline while N messages arrived (default 100,000, over
//! C conversations) connects and catches up as docs/PROTOCOL.md section 11 says: it
//! lists `ConversationStates`, then asks `CatchUp` pages for each conversation above
//! its cursor until a page says `complete` (conversations in parallel, one page in
//! flight each). Reports messages/s received and the time until every conversation is
//! complete, and next to it the time to read the same entries straight from the store:
//! the broker (owned by the harness) is stopped and its store opened on the same data
//! dir, and `Store::entries` reads the same ranges in pages of the same size, one
//! conversation after another on one thread. That is what a catch-up costs at the
//! least; the difference is the broker and the network.

use std::sync::Arc;
use std::time::Instant;

use switchboard_protocol::{Body, ConvId, Seq};

use crate::load::{Population, create_group};
use crate::payload;
use crate::report::{Percentiles, Report};
use crate::scenario::params;
use crate::target::embedded_config;
use crate::{Common, Error, Result, run_tag};

/// `catchup` flags.
#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Messages the device missed, over all conversations.
    #[arg(long, default_value_t = 100_000)]
    pub messages: u64,
    /// Conversations they are spread over (round robin).
    #[arg(long, default_value_t = 1)]
    pub convs: usize,
    /// Entries per `CatchUp` page asked for (the broker caps pages at 1000 entries).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u16).range(1..=i64::from(switchboard_protocol::limits::CATCH_UP_PAGE_MAX)))]
    pub page: u16,
    /// Messages in flight while filling the conversations (not measured).
    #[arg(long, default_value_t = 256)]
    pub fill_window: usize,
    /// How long the device stays offline after the last message, e.g. `75s` (not
    /// measured). Past the broker's `conversation_idle_ms` and one tick (60 s and 15 s
    /// by default) the conversations' actors have retired, as after any real time
    /// offline, and the pages are answered from the store without them; at 0 (the
    /// default) the actors that took the messages answer.
    #[arg(long, default_value = "0s", value_parser = crate::parse_duration)]
    pub offline: std::time::Duration,
}

/// What catching up one conversation gave.
struct Caught {
    conv: ConvId,
    /// Text messages received.
    texts: u64,
    /// Entries received.
    entries: u64,
    /// Entries arrived in seq order from the cursor with no gap or repeat.
    gapless: bool,
    /// Newest seq of the completing page.
    last_seq: Seq,
}

/// Runs the scenario.
pub async fn run(common: &Common, args: &Args) -> Result<Report> {
    common.refuse_rate_flags("catchup", "catches up on --messages once")?;
    if !(args.messages >= 1 && args.convs >= 1 && args.page >= 1 && args.fill_window >= 1) {
        return Err(Error::InvalidArgs("need 1+ messages, convs, page and fill window".into()));
    }
    let target = common.target().await?;
    let pop = Population::enroll(&target, &run_tag(), 2).await?;
    let (writer, reader) = (0, 1);
    let mut convs = Vec::with_capacity(args.convs);
    for c in 0..args.convs {
        convs.push(create_group(&pop, writer, &[writer, reader], &format!("catchup {c}")).await?);
    }

    // The reader's device is offline (enrolled, never connected since) while these arrive.
    let fill_start = Instant::now();
    let sent = fill(&pop, writer, &convs, args.messages, args.fill_window, common.size).await?;
    let fill_s = fill_start.elapsed().as_secs_f64();
    tokio::time::sleep(args.offline).await;

    let client = Arc::new(pop.client(reader).await?);
    let start = Instant::now();
    let states = client.conversation_states().await?;
    let mut set = tokio::task::JoinSet::new();
    let pages = Arc::new(std::sync::Mutex::new(hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?));
    for state in states.into_iter().filter(|s| convs.contains(&s.summary.id)) {
        // The device holds nothing of these: its cursor is 0.
        let (client, pages, page) = (client.clone(), pages.clone(), args.page);
        set.spawn(async move { catch_up(&client, state.summary.id, 0, page, &pages).await });
    }
    let mut caught = Vec::with_capacity(convs.len());
    while let Some(done) = set.join_next().await {
        caught.push(done??);
    }
    let catch_up_s = start.elapsed().as_secs_f64().max(1e-9);
    client.close();
    let pages = Percentiles::from_us(&pages.lock().unwrap_or_else(|p| p.into_inner()));

    let texts: u64 = caught.iter().map(|c| c.texts).sum();
    let entries: u64 = caught.iter().map(|c| c.entries).sum();
    let ranges: Vec<(ConvId, Seq)> = caught.iter().map(|c| (c.conv, c.last_seq)).collect();
    let data = target.stop_keeping_data().await?;
    let store = match &data {
        Some(dir) => Some(read_store(dir.path().join("data"), ranges, args.page).await?),
        None => None,
    };

    let mut report = Report {
        scenario: "catchup".into(),
        command: common.command.clone(),
        params: params([
            ("messages", args.messages.to_string()),
            ("convs", args.convs.to_string()),
            ("page", format!("{} entries", args.page)),
            ("offline", format!("{} ms", args.offline.as_millis())),
            ("size", format!("{} B", common.size)),
        ]),
        duration_s: catch_up_s,
        sent,
        acked: sent,
        // Acknowledged while the reader was away (the fill), delivered by its catch-up.
        acked_per_s: sent as f64 / fill_s.max(1e-9),
        delivered: texts,
        delivered_per_s: texts as f64 / catch_up_s,
        ..Report::default()
    };
    report.event_latency.insert("catch-up page".into(), pages);
    report.extra.insert("catchup_seconds_to_complete".into(), catch_up_s);
    report.extra.insert("catchup_messages_per_s".into(), texts as f64 / catch_up_s);
    report.extra.insert("catchup_entries".into(), entries as f64);
    report.extra.insert("fill_seconds".into(), fill_s);
    match store {
        Some((store_s, store_entries)) => {
            report.extra.insert("store_read_seconds".into(), store_s);
            report.extra.insert("store_read_entries_per_s".into(), store_entries as f64 / store_s.max(1e-9));
            report.extra.insert("catchup_over_store_read_time".into(), catch_up_s / store_s.max(1e-9));
            report.check(
                "the store holds the same entries",
                store_entries == entries,
                format!("{store_entries} read from the store, {entries} caught up"),
            );
        }
        None => {
            report.params.insert("store read".into(), "not measured (remote broker)".into());
        }
    }
    report.check("every missed message caught up", texts == sent, format!("{texts} of {sent}"));
    let gaps = caught.iter().filter(|c| !c.gapless).count();
    report.check("pages in order, no gap or repeat", gaps == 0, format!("{gaps} conversations with a gap"));
    report.check(
        "every conversation completed",
        caught.len() == convs.len(),
        format!("{} of {}", caught.len(), convs.len()),
    );
    Ok(report)
}

/// Sends `messages` into `convs` (round robin) as `writer`, `window` in flight at a
/// time; returns how many were acknowledged.
async fn fill(
    pop: &Population,
    writer: usize,
    convs: &[ConvId],
    messages: u64,
    window: usize,
    size: usize,
) -> Result<u64> {
    let client = Arc::new(pop.client(writer).await?);
    let mut set = tokio::task::JoinSet::new();
    let mut text = String::new();
    payload::fill(&mut text, 0, size);
    let text: Arc<str> = text.into();
    let mut acked = 0u64;
    for i in 0..messages {
        while set.len() >= window {
            if let Some(done) = set.join_next().await {
                done??;
                acked += 1;
            }
        }
        let (client, text, conv) = (client.clone(), text.clone(), convs[(i % convs.len() as u64) as usize]);
        set.spawn(async move { send_taken(&client, conv, &text).await });
    }
    while let Some(done) = set.join_next().await {
        done??;
        acked += 1;
    }
    client.close();
    Ok(acked)
}

/// Sends `text` to `conv` until the broker takes it: a send refused `OVERLOADED` (its
/// admission sheds writes while its commits run behind, as on a machine busy with other
/// work) is sent again with the same client id after a pause, at most 50 times. The
/// fill is set-up, not the measured part: a refusal failed the whole run before.
async fn send_taken(client: &switchboard_client::Client, conv: ConvId, text: &str) -> Result<()> {
    let id = switchboard_client::new_client_id();
    let mut refused = 0;
    loop {
        match client.send_with_id(conv, id, text).await {
            Err(e) if e.code() == Some(switchboard_protocol::ErrorCode::OVERLOADED) && refused < 50 => {
                refused += 1;
                tokio::time::sleep(std::time::Duration::from_millis(20 * refused)).await;
            }
            other => return other.map(drop).map_err(Error::from),
        }
    }
}

/// Catches up `conv` after `after`, `page` entries at a time, until a page completes.
async fn catch_up(
    client: &switchboard_client::Client,
    conv: ConvId,
    mut after: Seq,
    page: u16,
    pages: &std::sync::Mutex<hdrhistogram::Histogram<u64>>,
) -> Result<Caught> {
    let mut caught = Caught { conv, texts: 0, entries: 0, gapless: true, last_seq: after };
    loop {
        let t = Instant::now();
        let got = client.catch_up(conv, after, page).await?;
        let _ = pages.lock().unwrap_or_else(|p| p.into_inner()).record((t.elapsed().as_micros() as u64).max(1));
        for e in &got.entries {
            caught.gapless &= e.seq == after + 1;
            after = e.seq;
            caught.entries += 1;
            if matches!(e.body, Body::Text { .. }) {
                caught.texts += 1;
            }
        }
        caught.last_seq = got.last_seq;
        if got.complete {
            caught.gapless &= after == got.last_seq;
            return Ok(caught);
        }
        if got.entries.is_empty() {
            return Err(Error::Protocol(format!("conversation {conv}: a catch-up page with no entry is not complete")));
        }
    }
}

/// Opens the stopped broker's store and reads `(conv, 1..=last_seq)` of each range in
/// pages of `page` entries; returns the seconds it took and the entries read.
async fn read_store(data_dir: std::path::PathBuf, ranges: Vec<(ConvId, Seq)>, page: u16) -> Result<(f64, u64)> {
    tokio::task::spawn_blocking(move || -> Result<(f64, u64)> {
        let store = switchboard_broker::open_store(&embedded_config(data_dir, 1))?;
        let start = Instant::now();
        let mut read = 0u64;
        for (conv, last_seq) in ranges {
            let mut from = 1;
            while from <= last_seq {
                let entries = store
                    .entries(conv, from, last_seq, usize::from(page), false)
                    .map_err(|e| Error::Store(e.to_string()))?;
                let Some(last) = entries.last() else { break };
                from = last.seq + 1;
                read += entries.len() as u64;
            }
        }
        let seconds = start.elapsed().as_secs_f64();
        store.close().map_err(|e| Error::Store(e.to_string()))?;
        Ok((seconds, read))
    })
    .await?
}
