//! sled's tree as `patches/sled` shapes it: index nodes split above 64 children instead
//! of 256 (`node.rs`, `INDEX_SPLIT_FANOUT`), so the parent that every leaf split writes
//! again is a quarter as wide; and a leaf copied for an insert has room for it. The store
//! writes its keys the way these tests do: many conversations, each appending at the end
//! of its own key range, in turn.

#![allow(clippy::unwrap_used)]

/// A key of `range` at `seq`, laid out like the store's entry keys: a kind byte, then
/// big-endian conversation and seq.
fn key(range: u64, seq: u64) -> Vec<u8> {
    let mut key = vec![1];
    key.extend_from_slice(&range.to_be_bytes());
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn value(range: u64, seq: u64) -> Vec<u8> {
    (range ^ seq).to_be_bytes().to_vec()
}

fn open(path: &std::path::Path) -> sled::Db {
    sled::Config::new().path(path).flush_every_ms(None).open().unwrap()
}

/// `RANGES` ranges each append `ROUNDS` keys, in turn, with a flush every 50 inserts (as
/// group commits do): most of the log's bytes are the leaves and parents that splits
/// write again. With parents of up to 256 children (sled unpatched) this wrote 347 bytes
/// of log per insert of a 25-byte key and value; with at most 64, 167.
#[test]
fn a_leaf_split_writes_a_narrow_parent() {
    const RANGES: u64 = 2_000;
    const ROUNDS: u64 = 40;
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let mut logged = 0;
    for seq in 1..=ROUNDS {
        for range in 0..RANGES {
            db.insert(key(range, seq), value(range, seq)).unwrap();
            // A flush returns the log bytes it made stable; between flushes a log buffer
            // never fills (a full one is written by sled's I/O pool, uncounted).
            if range % 50 == 49 {
                logged += db.flush().unwrap();
            }
        }
    }
    let per_insert = logged as u64 / (RANGES * ROUNDS);
    assert!(per_insert < 250, "{per_insert} bytes of log per insert of an 8-byte value");
}

/// The narrow index nodes split, and merge again when most keys go, without losing or
/// reordering a key, and a reopened tree reads the same.
#[test]
fn narrow_index_nodes_keep_every_key_through_splits_merges_and_reopens() {
    const RANGES: u64 = 500;
    const ROUNDS: u64 = 60;
    let dir = tempfile::tempdir().unwrap();
    let expect = |kept: &dyn Fn(u64, u64) -> bool| -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut all: Vec<_> = (0..RANGES)
            .flat_map(|r| (1..=ROUNDS).map(move |s| (r, s)))
            .filter(|&(r, s)| kept(r, s))
            .map(|(r, s)| (key(r, s), value(r, s)))
            .collect();
        all.sort();
        all
    };
    let read = |db: &sled::Db| -> Vec<(Vec<u8>, Vec<u8>)> {
        db.iter().map(|item| item.unwrap()).map(|(k, v)| (k.to_vec(), v.to_vec())).collect()
    };
    {
        let db = open(dir.path());
        for seq in 1..=ROUNDS {
            for range in 0..RANGES {
                db.insert(key(range, seq), value(range, seq)).unwrap();
            }
        }
        db.flush().unwrap();
        assert_eq!(read(&db), expect(&|_, _| true));
        // All but one key in 25 go: leaves fall below 4 keys and index nodes below 16
        // children, and merge.
        for seq in 1..=ROUNDS {
            for range in 0..RANGES {
                if (range + seq) % 25 != 0 {
                    db.remove(key(range, seq)).unwrap();
                }
            }
        }
        db.flush().unwrap();
        assert_eq!(read(&db), expect(&|r, s| (r + s) % 25 == 0));
    }
    // sled's I/O threads may hold the file lock a moment after the last handle drops.
    let db = (0..50)
        .find_map(|_| {
            sled::Config::new().path(dir.path()).flush_every_ms(None).open().ok().or_else(|| {
                std::thread::sleep(std::time::Duration::from_millis(100));
                None
            })
        })
        .unwrap();
    let kept = expect(&|r, s| (r + s) % 25 == 0);
    assert_eq!(read(&db), kept);
    for (k, v) in &kept {
        assert_eq!(db.get(k).unwrap().as_deref(), Some(&v[..]));
    }
    assert_eq!(db.get(key(1, 1)).unwrap(), None, "a removed key stays removed");
    // And it grows again at the end of every range.
    for range in 0..RANGES {
        db.insert(key(range, ROUNDS + 1), value(range, ROUNDS + 1)).unwrap();
    }
    let mut grown = kept;
    grown.extend((0..RANGES).map(|r| (key(r, ROUNDS + 1), value(r, ROUNDS + 1))));
    grown.sort();
    assert_eq!(read(&db), grown);
}
