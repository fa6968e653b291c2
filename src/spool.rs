//! The disk spool (`CALLSCOPE_SPOOL_DIR`): every payload not yet acknowledged is written here
//! before it is sent, so a crash or a receiver outage does not lose it.
//!
//! Layout: append-only segment files `<id>.seg` (id zero-padded, increasing). Each record is
//! framed as `len: u32 LE | crc32c(payload): u32 LE | payload`. A payload is either a data
//! record (a core or detail body and what the worker needs to resend it) or an ack record naming
//! a data record that was acknowledged. A segment file is deleted, at a sync (once the acks and
//! any records that replaced its own are durable), when every data record in it was
//! acknowledged and it is no longer the one being appended to. Its ack records go with it: a
//! record of an older segment they acknowledged is then replayed at the next start, a
//! duplicate the receiver drops by its idempotency key (keeping every ack-carrying segment
//! instead would let one long-pending record pin all later segments on disk). At start,
//! segments with nothing pending are deleted too, after every leftover segment was fsynced (a
//! crashed run's acks may have been in the page cache only). After a failed fsync nothing more
//! is found deletable until the process restarts (the files of segments an earlier, successful
//! sync found deletable are still removed): the files may then outgrow
//! `CALLSCOPE_SPOOL_MAX_BYTES`, which counts pending records only.
//!
//! A detail batch's number must never be used twice for its call, but the record that took
//! it may be acknowledged and its segment deleted while other batches of the call are still
//! pending. So the spool keeps, per call, the number after the highest it wrote (`next`) and
//! which pending records carry it. When the last record carrying it is acknowledged a mark
//! record (`call`, `next`) is written beside the ack, and each new segment opens with a mark
//! of every call whose `next` no pending record carries, made durable before any older
//! segment can be deleted. So after a restart a pending call's `next` is in one of its
//! pending records or in a mark of a segment still on disk. (The spool holds one small entry
//! per pending detail record for this, bounded as the records are by
//! `CALLSCOPE_SPOOL_MAX_BYTES`.)
//!
//! Records that must reach the disk together (a 413 split: two halves, a renumbered final and
//! the acks of what they replace) are written as one group frame holding their frames: a crash
//! finds all of them or none. Each record keeps its own place (the offset of its inner frame),
//! so it is read and acknowledged like any other.
//!
//! Recovery reads the segments in order; the first frame that is short, has a zero length or
//! fails its CRC ends that segment (a torn or corrupt tail): it is counted, the file is cut back
//! to its valid prefix, and every record before it is replayed. The framing and recovery logic below
//! (`frame`, `read_frames`, `Payload::decode`) is pure and tested without a disk.
//!
//! All spool I/O runs on the worker thread, never in `on_end`, except the fsyncs that make
//! records durable before they are sent and the removal of deleted segments' files: the
//! worker hands those to a thread of its own ([`Spool::begin_sync`], [`SyncJob::run`],
//! [`Spool::end_sync`]) and goes on writing; a record counts as synced once an fsync that
//! began after it was written ended. A segment rotation does not fsync either: the next sync
//! fsyncs the old segment's last writes, the new segment (its marks) and the directory.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Bytes of a frame header (`len` and `crc`).
const HEADER: usize = 8;
/// Largest payload accepted when reading (a longer `len` is a corrupt frame).
const MAX_PAYLOAD: usize = 1 << 30;
/// A segment is closed and a new one started past this size.
const SEGMENT_BYTES: u64 = 4 << 20;

const TAG_CORE: u8 = 1;
const TAG_DETAIL: u8 = 2;
const TAG_ACK: u8 = 3;
const TAG_MARK: u8 = 4;
/// A group frame: `TAG_GROUP` followed by the frames of records written as one unit.
const TAG_GROUP: u8 = 5;
/// Where a group's first inner frame starts, from the group frame's start.
const GROUP_HEAD: u64 = HEADER as u64 + 1;
const FLAG_FINAL: u8 = 1;
const FLAG_LATE: u8 = 2;
/// The body is gzip, ready to send (else JSON).
const FLAG_GZIP: u8 = 4;

/// Where a data record lives: its segment and its byte offset there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct RecId {
    pub seg: u64,
    pub off: u64,
}

/// What a data record is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Meta {
    /// Core summary (else a detail batch).
    pub core: bool,
    /// A detail batch with `"final": true`.
    pub is_final: bool,
    /// A detail batch of late spans.
    pub late: bool,
    pub seq: u32,
    /// Spans in the batch.
    pub spans: u32,
    pub call_id: String,
    /// The body is gzip-compressed, as it goes on the wire (else it is JSON).
    pub gzip: bool,
}

/// A record's payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Payload {
    /// A body to deliver (JSON, or gzip when `meta.gzip`).
    Data { meta: Meta, json: Vec<u8> },
    /// The data record at this place was acknowledged.
    Ack(RecId),
    /// `call_id` wrote detail batches numbered below `next` (a segment's opening snapshot).
    Mark { call_id: String, next: u32 },
}

impl Payload {
    /// Serializes the payload (without the frame).
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Payload::Data { meta, json } => {
                out.push(if meta.core { TAG_CORE } else { TAG_DETAIL });
                let flags = if meta.is_final { FLAG_FINAL } else { 0 }
                    | if meta.late { FLAG_LATE } else { 0 }
                    | if meta.gzip { FLAG_GZIP } else { 0 };
                out.push(flags);
                out.extend_from_slice(&meta.seq.to_le_bytes());
                out.extend_from_slice(&meta.spans.to_le_bytes());
                put_id(&meta.call_id, out);
                out.extend_from_slice(json);
            }
            Payload::Ack(id) => {
                out.push(TAG_ACK);
                out.extend_from_slice(&id.seg.to_le_bytes());
                out.extend_from_slice(&id.off.to_le_bytes());
            }
            Payload::Mark { call_id, next } => {
                out.push(TAG_MARK);
                out.extend_from_slice(&next.to_le_bytes());
                put_id(call_id, out);
            }
        }
    }

    /// Parses a payload; `None` for anything malformed (never panics).
    pub(crate) fn decode(b: &[u8]) -> Option<Payload> {
        let (&tag, rest) = b.split_first()?;
        match tag {
            TAG_ACK => {
                let seg = u64::from_le_bytes(rest.get(0..8)?.try_into().ok()?);
                let off = u64::from_le_bytes(rest.get(8..16)?.try_into().ok()?);
                (rest.len() == 16).then_some(Payload::Ack(RecId { seg, off }))
            }
            TAG_MARK => {
                let next = u32::from_le_bytes(rest.get(0..4)?.try_into().ok()?);
                let (id, rest) = take_id(rest.get(4..)?)?;
                rest.is_empty().then(|| Payload::Mark {
                    call_id: id.to_owned(),
                    next,
                })
            }
            TAG_CORE | TAG_DETAIL => {
                let flags = *rest.first()?;
                let seq = u32::from_le_bytes(rest.get(1..5)?.try_into().ok()?);
                let spans = u32::from_le_bytes(rest.get(5..9)?.try_into().ok()?);
                let (id, json) = take_id(rest.get(9..)?)?;
                let json = json.to_vec();
                Some(Payload::Data {
                    meta: Meta {
                        core: tag == TAG_CORE,
                        is_final: flags & FLAG_FINAL != 0,
                        late: flags & FLAG_LATE != 0,
                        seq,
                        spans,
                        call_id: id.to_owned(),
                        gzip: flags & FLAG_GZIP != 0,
                    },
                    json,
                })
            }
            _ => None,
        }
    }
}

/// Writes a call id as `len: u16 LE | bytes`.
fn put_id(call_id: &str, out: &mut Vec<u8>) {
    // Call ids are capped at 256 bytes upstream; be safe anyway.
    let id = crate::call::truncate_str(call_id, usize::from(u16::MAX));
    out.extend_from_slice(&(id.len() as u16).to_le_bytes());
    out.extend_from_slice(id.as_bytes());
}

/// Reads what [`put_id`] wrote: the id and the bytes after it.
fn take_id(b: &[u8]) -> Option<(&str, &[u8])> {
    let n = usize::from(u16::from_le_bytes(b.get(0..2)?.try_into().ok()?));
    let id = std::str::from_utf8(b.get(2..2 + n)?).ok()?;
    Some((id, b.get(2 + n..)?))
}

/// The payloads, encoded and framed one after another.
fn frame_all<'a>(payloads: impl IntoIterator<Item = &'a Payload>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut p = Vec::new();
    for payload in payloads {
        p.clear();
        payload.encode(&mut p);
        frame(&p, &mut out);
    }
    out
}

/// Appends one framed payload to `out`.
pub(crate) fn frame(payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// The frames of a segment: `(offset, payload)` of each valid frame in order, and the length
/// of the valid prefix (less than `buf.len()` when the tail is torn or corrupt).
pub(crate) fn read_frames(buf: &[u8]) -> (Vec<(u64, &[u8])>, usize) {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < buf.len() {
        let Some(head) = buf.get(at..at + HEADER) else {
            break;
        };
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        // Every payload has at least its tag byte: a zero length is a zero-filled (torn) tail,
        // whose "frames" would pass the check (the CRC of nothing is 0).
        if len == 0 || len > MAX_PAYLOAD {
            break;
        }
        let Some(payload) = buf.get(at + HEADER..at + HEADER + len) else {
            break;
        };
        if crc32c::crc32c(payload) != crc {
            break;
        }
        out.push((at as u64, payload));
        at += HEADER + len;
    }
    (out, at)
}

/// A data record read back at start (its body stays on disk until its turn comes).
#[derive(Debug)]
pub(crate) struct Recovered {
    pub id: RecId,
    pub meta: Meta,
    /// Bytes the record takes on disk.
    pub bytes: u64,
}

/// What the segments read so far hold: their data records, the acks they carry and the batch
/// numbers they show each call used.
#[derive(Default)]
struct Recovery {
    data: Vec<Recovered>,
    acked: HashSet<RecId>,
    next: HashMap<String, u32>,
}

impl Recovery {
    /// Reads one segment (segments are read in id order); returns the length of its valid
    /// prefix.
    fn scan(&mut self, seg: u64, buf: &[u8]) -> usize {
        let (frames, valid) = read_frames(buf);
        for (off, p) in frames {
            match p.split_first() {
                // One level only: a group inside a group is never written.
                Some((&TAG_GROUP, inner)) => {
                    for (o, q) in read_frames(inner).0 {
                        self.take(seg, off + GROUP_HEAD + o, q);
                    }
                }
                _ => self.take(seg, off, p),
            }
        }
        valid
    }

    /// Takes in one record's payload, found at `off` of segment `seg`.
    fn take(&mut self, seg: u64, off: u64, p: &[u8]) {
        match Payload::decode(p) {
            Some(Payload::Ack(id)) => {
                self.acked.insert(id);
            }
            Some(Payload::Mark { call_id, next }) => raise(&mut self.next, &call_id, next),
            Some(Payload::Data { meta, .. }) => {
                if !meta.core {
                    raise(&mut self.next, &meta.call_id, meta.seq.saturating_add(1));
                }
                self.data.push(Recovered {
                    id: RecId { seg, off },
                    meta,
                    bytes: (HEADER + p.len()) as u64,
                });
            }
            None => {}
        }
    }

    /// The records not acknowledged, in the order they were written, and the numbers of the
    /// calls with pending detail.
    fn finish(mut self) -> (Vec<Recovered>, Numbers) {
        let acked = &self.acked;
        self.data.retain(|r| !acked.contains(&r.id));
        let mut numbers = Numbers::default();
        for r in self.data.iter().filter(|r| !r.meta.core) {
            let next = self.next.get(&r.meta.call_id).copied().unwrap_or(0);
            numbers.add(Some(r.id), &r.meta.call_id, r.meta.seq, next);
        }
        (self.data, numbers)
    }
}

/// `next[call] = max(next[call], n)`.
fn raise(next: &mut HashMap<String, u32>, call: &str, n: u32) {
    match next.get_mut(call) {
        Some(v) => *v = (*v).max(n),
        None => {
            next.insert(call.to_owned(), n);
        }
    }
}

/// The pure half of recovery: the unacknowledged data records of several segments
/// (`(segment id, file bytes)` in id order), per segment the length of its valid prefix, and
/// each call with pending detail's next batch number.
#[cfg(test)]
pub(crate) fn recover(
    segs: &[(u64, Vec<u8>)],
) -> (Vec<Recovered>, Vec<usize>, HashMap<String, u32>) {
    let mut r = Recovery::default();
    let valid = segs.iter().map(|(seg, buf)| r.scan(*seg, buf)).collect();
    let (data, numbers) = r.finish();
    (data, valid, numbers.pending().into_iter().collect())
}

/// The batch numbers of the calls with detail in the spool (see the module docs).
#[derive(Debug, Default)]
struct Numbers {
    /// Each pending detail record: its call and number.
    live: HashMap<RecId, (Arc<str>, u32)>,
    calls: HashMap<Arc<str>, CallSeq>,
}

#[derive(Debug, Default)]
struct CallSeq {
    /// The number after the highest batch number the call wrote.
    next: u32,
    /// Its pending detail records.
    live: u32,
    /// Those numbered `next - 1`: while there is one, it carries `next`.
    at_top: u32,
    /// It had no pending record at the last new segment (it is forgotten at the next one).
    idle: bool,
}

impl Numbers {
    /// `call` used number `seq`, for record `id`, which is pending (`None`: a record that
    /// could not be written); `next` is what else is known of the call's numbers (0 if
    /// nothing).
    fn add(&mut self, id: Option<RecId>, call: &str, seq: u32, next: u32) {
        let (key, c) = self.call(call);
        c.next = c.next.max(next);
        let n = seq.saturating_add(1);
        if n > c.next {
            c.next = n;
            c.at_top = 0;
        }
        c.idle = false;
        let Some(id) = id else {
            return;
        };
        if n == c.next {
            c.at_top += 1;
        }
        c.live += 1;
        self.live.insert(id, (key, seq));
    }

    /// `call`'s entry (made if new) and its shared id.
    fn call(&mut self, call: &str) -> (Arc<str>, &mut CallSeq) {
        let key = match self.calls.get_key_value(call) {
            Some((k, _)) => k.clone(),
            None => {
                let k: Arc<str> = Arc::from(call);
                self.calls.insert(k.clone(), CallSeq::default());
                k
            }
        };
        let c = self.calls.get_mut(&key).expect("inserted above");
        (key, c)
    }

    /// Record `id` is no longer pending. Returns its call and number (`None` for a record not
    /// counted here: a summary's), and the mark to write now when it was the last to carry
    /// its call's `next`.
    fn remove(&mut self, id: RecId) -> (Option<(Arc<str>, u32)>, Option<Payload>) {
        let Some((call, seq)) = self.live.remove(&id) else {
            return (None, None);
        };
        let mut mark = None;
        if let Some(c) = self.calls.get_mut(&call) {
            c.live = c.live.saturating_sub(1);
            if seq.saturating_add(1) == c.next {
                c.at_top = c.at_top.saturating_sub(1);
                if c.at_top == 0 {
                    mark = Some(Payload::Mark {
                        call_id: call.to_string(),
                        next: c.next,
                    });
                }
            }
        }
        (Some((call, seq)), mark)
    }

    /// At a new segment: the marks it opens with (each call whose `next` no pending record
    /// carries), after forgetting the calls with no pending record since the last one.
    fn rotate(&mut self) -> Vec<Payload> {
        self.calls.retain(|_, c| !(c.idle && c.live == 0));
        let mut marks = Vec::new();
        for (call, c) in &mut self.calls {
            c.idle = c.live == 0;
            if c.at_top == 0 {
                marks.push(Payload::Mark {
                    call_id: call.to_string(),
                    next: c.next,
                });
            }
        }
        marks
    }

    /// Each call with pending detail and its `next`, in call order.
    #[cfg(test)]
    fn pending(&self) -> Vec<(String, u32)> {
        let mut v: Vec<(String, u32)> = self
            .calls
            .iter()
            .filter(|(_, c)| c.live > 0)
            .map(|(k, c)| (k.to_string(), c.next))
            .collect();
        v.sort_unstable();
        v
    }
}

#[derive(Debug, Default)]
struct Segment {
    /// Unacknowledged data records.
    live: usize,
    /// Their bytes.
    live_bytes: u64,
}

/// The open spool. Not thread-safe by design: only the worker owns it.
#[derive(Debug)]
pub(crate) struct Spool {
    dir: Arc<Path>,
    max_bytes: u64,
    segs: BTreeMap<u64, Segment>,
    cur_id: u64,
    /// The segment appended to (shared with the syncs that fsync it on another thread).
    cur: Arc<File>,
    /// Segments rotated away whose last writes no ended sync covered yet, oldest first: the
    /// next syncs fsync them with the current one (a rotation does not wait for the disk).
    closed: Vec<(u64, Arc<File>)>,
    /// Segments found deletable whose files are not removed yet: the next sync removes them
    /// (a background one off the worker thread).
    unlink: Vec<u64>,
    cur_len: u64,
    /// Bytes of the mark records that open the current segment.
    cur_head: u64,
    live_bytes: u64,
    /// The batch numbers of the calls with detail here.
    numbers: Numbers,
    /// Every record before this place (segment, offset) was covered by an fsync: a payload
    /// is sent only once its record is ([`synced`](Self::synced)). A failed fsync counts too
    /// (it is reported; its records are sent all the same, as they are kept in memory).
    synced: (u64, u64),
    /// Where the writes covered by the last fsync begun (maybe still running) end.
    begun: (u64, u64),
    /// An fsync failed: a later one may report success for data that never reached the disk
    /// (Linux forgets a writeback error once reported), so no segment is deleted any more in
    /// this run (the next start replays what they held; the receiver drops duplicates).
    sync_failed: bool,
    /// The open group (see [`begin_group`](Self::begin_group)).
    group: Option<Group>,
    /// A group failed to be written: its records' places in the current segment must not be
    /// given to other records, so the next write starts a new segment.
    tail_broken: bool,
    /// A call's number lost its carrier without its mark reaching the disk (a write failed):
    /// no segment is deleted until a new segment's head carries it.
    marks_owed: bool,
    scratch: Vec<u8>,
}

/// An fsync begun by [`Spool::begin_sync`], to run on another thread.
#[derive(Debug)]
pub(crate) struct SyncJob {
    dir: Arc<Path>,
    /// The segments it fsyncs: those rotated away since the last sync began, then the one
    /// appended to.
    files: Vec<Arc<File>>,
    /// A segment was created since the last sync began: the directory is fsynced too.
    sync_dir: bool,
    /// Where the writes it covers end.
    upto: (u64, u64),
    /// Segments with nothing pending when it began.
    done: Vec<u64>,
    /// Segments earlier syncs found deletable: their files are removed after the fsyncs.
    unlink: Vec<u64>,
}

impl SyncJob {
    /// The fsyncs, then the removal of the segments to delete (blocking).
    pub(crate) fn run(&self) -> io::Result<()> {
        let synced = sync_files(&self.files, self.sync_dir.then_some(&*self.dir));
        remove_segments(&self.dir, &self.unlink);
        synced
    }
}

/// fsyncs each file (its data), and `dir` (a segment was created in it). Every one is tried
/// whatever the others gave (the records of each count as synced afterwards); the first
/// failure is returned.
fn sync_files<'a>(
    files: impl IntoIterator<Item = &'a Arc<File>>,
    dir: Option<&Path>,
) -> io::Result<()> {
    let mut first = Ok(());
    for f in files {
        first = first.and(fsync(f, false));
    }
    // Make a new segment's name durable: until then a power loss can take the file, records
    // and all.
    if let Some(d) = dir {
        match File::open(d).and_then(|d| d.sync_all()) {
            Ok(()) => {}
            // The file system cannot fsync a directory, or (Windows) a directory cannot be
            // opened as a file: nothing more can be done.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Unsupported | io::ErrorKind::InvalidInput
                ) || (cfg!(windows) && e.kind() == io::ErrorKind::PermissionDenied) => {}
            Err(e) => first = first.and(Err(e)),
        }
    }
    first
}

/// What opening the spool found.
#[derive(Debug, Default)]
pub(crate) struct Opened {
    /// Unacknowledged records, in the order they were written.
    pub records: Vec<Recovered>,
    /// Segments whose tail was torn or corrupt (and cut off).
    pub corrupt_tails: u64,
    /// Bytes cut off those tails.
    pub corrupt_bytes: u64,
}

/// Records kept back to be written as one frame.
#[derive(Debug)]
struct Group {
    /// Where its frame will start in the current segment.
    start: u64,
    /// The inner frames.
    frames: Vec<u8>,
    /// How to undo what it did to the counts, should it fail to be written.
    undo: Vec<Undo>,
    /// `begin_group` calls not yet ended.
    depth: u32,
}

#[derive(Debug)]
enum Undo {
    Append(RecId, u64),
    Ack(RecId, u64, Option<(Arc<str>, u32)>),
}

/// A group could not be written: none of its records is on disk, and none of its acks.
#[derive(Debug)]
pub(crate) struct GroupFailed {
    pub error: io::Error,
    /// The places [`Spool::append`] gave its records: they do not exist.
    pub places: Vec<RecId>,
}

fn seg_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.seg"))
}

impl Spool {
    /// Opens (creating) the spool in `dir` and reads back what a previous run left.
    pub(crate) fn open(dir: &Path, max_bytes: u64) -> io::Result<(Spool, Opened)> {
        fs::create_dir_all(dir)?;
        let mut ids: Vec<u64> = Vec::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".seg")) else {
                continue;
            };
            if let Ok(id) = stem.parse::<u64>() {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        // One segment in memory at a time.
        let mut recovery = Recovery::default();
        let mut opened = Opened::default();
        let mut present = Vec::with_capacity(ids.len());
        for &id in &ids {
            let path = seg_path(dir, id);
            let mut buf = Vec::new();
            match File::open(&path) {
                Ok(mut f) => f.read_to_end(&mut buf)?,
                // Removed since it was listed: an earlier spool's fsync thread in this process
                // deleting an acknowledged segment, as it may finish after that spool closed.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            present.push(id);
            let ok = recovery.scan(id, &buf);
            if ok < buf.len() {
                opened.corrupt_tails += 1;
                opened.corrupt_bytes += (buf.len() - ok) as u64;
                tracing::warn!(
                    segment = id,
                    valid_bytes = ok,
                    cut_bytes = buf.len() - ok,
                    "spool segment has a torn or corrupt tail: cut off, the records before it are replayed"
                );
                match File::options().write(true).open(&path) {
                    Ok(f) => f.set_len(ok as u64)?,
                    // Removed since it was read (as above): it held nothing pending.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        // Past every id listed, removed or not: a file an earlier spool's thread is still to
        // remove must not be taken for the new one.
        let cur_id = match ids.last() {
            Some(l) => l.checked_add(1).ok_or_else(ids_exhausted)?,
            None => 0,
        };
        let ids = present;
        let (records, mut numbers) = recovery.finish();
        let mut segs: BTreeMap<u64, Segment> =
            ids.iter().map(|&id| (id, Segment::default())).collect();
        let mut live_bytes = 0;
        for r in &records {
            let s = segs.entry(r.id.seg).or_default();
            s.live += 1;
            s.live_bytes += r.bytes;
            live_bytes += r.bytes;
        }
        // The marks go first: the segments that held the numbers may be deleted below.
        let (cur, cur_head, mut marked) = new_segment(dir, cur_id, &numbers.rotate())?;
        // Durable before the segments that held the numbers are deleted.
        if let Err(e) = sync_files([&cur], Some(dir)) {
            tracing::warn!(segment = cur_id, error = %e,
                "could not fsync the batch numbers of pending calls in a new spool segment: no segment is deleted in this run (check the disk)");
            marked = false;
        }
        segs.insert(cur_id, Segment::default());
        opened.records = records;
        let mut spool = Spool {
            dir: Arc::from(dir),
            max_bytes,
            segs,
            cur_id,
            cur,
            closed: Vec::new(),
            unlink: Vec::new(),
            cur_len: cur_head,
            cur_head,
            live_bytes,
            numbers,
            // Records of earlier runs were made durable as the segments were read.
            synced: (cur_id, cur_head),
            begun: (cur_id, cur_head),
            sync_failed: !marked,
            group: None,
            tail_broken: false,
            marks_owed: false,
            scratch: Vec::new(),
        };
        // Segments with nothing left to deliver go now, on the word of acks a crashed run may
        // have left in the page cache only: make those durable first.
        if spool
            .segs
            .iter()
            .any(|(&id, s)| id != cur_id && s.live == 0)
        {
            for id in &ids {
                let path = seg_path(dir, *id);
                match File::options()
                    .write(true)
                    .open(&path)
                    .and_then(|f| fsync(&f, true))
                {
                    Ok(()) => {}
                    // Removed since it was read (as above): it held nothing pending.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        tracing::warn!(segment = %path.display(), error = %e,
                        "could not fsync a spool segment left by an earlier run: no segment is deleted in this run (check the disk); acknowledged records may be sent again after a restart");
                        spool.sync_failed = true;
                        break;
                    }
                }
            }
        }
        spool.collect();
        spool.unlink_now();
        Ok((spool, opened))
    }

    /// Bytes of unacknowledged records.
    #[cfg(test)]
    pub(crate) fn live_bytes(&self) -> u64 {
        self.live_bytes
    }

    /// Lets no more records in than those pending now (the spool is full from here).
    #[cfg(test)]
    pub(crate) fn fill_up(&mut self) {
        self.max_bytes = self.live_bytes;
    }

    /// Whether a record of `json_len` bytes fits under `CALLSCOPE_SPOOL_MAX_BYTES`.
    pub(crate) fn fits(&self, json_len: usize) -> bool {
        self.live_bytes + (json_len + 64) as u64 <= self.max_bytes
    }

    /// Appends a data record (not yet synced: call [`sync`](Self::sync) before relying on it).
    /// Returns where it is and the bytes it takes (to pass to [`ack`](Self::ack)).
    pub(crate) fn append(&mut self, meta: &Meta, json: &[u8]) -> io::Result<(RecId, u64)> {
        if self.group.is_none() && self.rotate_due() {
            self.rotate()?;
        }
        let payload = Payload::Data {
            meta: meta.clone(),
            json: Vec::new(),
        };
        let mut p = std::mem::take(&mut self.scratch);
        p.clear();
        payload.encode(&mut p);
        p.extend_from_slice(json);
        let mut framed = Vec::with_capacity(p.len() + HEADER);
        frame(&p, &mut framed);
        self.scratch = p;
        let put = self.put(&framed);
        if !meta.core {
            // A number is taken even if its record could not be written (the batch may still
            // go from memory).
            self.numbers
                .add(put.as_ref().ok().copied(), &meta.call_id, meta.seq, 0);
            self.marks_owed |= put.is_err();
        }
        let id = put?;
        let bytes = framed.len() as u64;
        self.count(id.seg, bytes, true);
        if let Some(g) = &mut self.group {
            g.undo.push(Undo::Append(id, bytes));
        }
        Ok((id, bytes))
    }

    /// Whether the current segment is to be closed before the next record.
    fn rotate_due(&self) -> bool {
        self.tail_broken || self.marks_owed || self.cur_len - self.cur_head >= SEGMENT_BYTES
    }

    /// Writes a framed record, or adds it to the open group; returns its place.
    fn put(&mut self, framed: &[u8]) -> io::Result<RecId> {
        let off = match &mut self.group {
            Some(g) => {
                let off = g.start + GROUP_HEAD + g.frames.len() as u64;
                g.frames.extend_from_slice(framed);
                off
            }
            None => {
                let off = self.cur_len;
                self.write(framed)?;
                off
            }
        };
        Ok(RecId {
            seg: self.cur_id,
            off,
        })
    }

    /// Starts a group: the records appended and acknowledged until
    /// [`end_group`](Self::end_group) reach the disk as one frame, all or none after a crash.
    /// Groups nest: the outermost one is written.
    pub(crate) fn begin_group(&mut self) {
        if let Some(g) = &mut self.group {
            g.depth += 1;
            return;
        }
        if self.rotate_due()
            && let Err(e) = self.rotate()
        {
            // The group then goes to the current segment, past its usual size (or, after a
            // failed group, is refused at its end).
            tracing::warn!(error = %e, "could not start a new spool segment");
        }
        self.group = Some(Group {
            start: self.cur_len,
            frames: Vec::new(),
            undo: Vec::new(),
            depth: 1,
        });
    }

    /// The number after the highest batch number `call` wrote here, while the spool keeps
    /// track of it (from its first record until a segment after its last is acknowledged).
    pub(crate) fn next_seq(&self, call: &str) -> Option<u32> {
        self.numbers.calls.get(call).map(|c| c.next)
    }

    /// Whether a group is open.
    pub(crate) fn in_group(&self) -> bool {
        self.group.is_some()
    }

    /// Ends a group: the outermost writes it as one frame. On failure nothing of it is on
    /// disk: its records' places do not exist (the caller keeps those payloads in memory),
    /// and what its acks acknowledged is pending again until a restart replays it.
    pub(crate) fn end_group(&mut self) -> Result<(), GroupFailed> {
        let g = match self.group.take() {
            Some(mut g) if g.depth > 1 => {
                g.depth -= 1;
                self.group = Some(g);
                return Ok(());
            }
            Some(g) if !g.frames.is_empty() => g,
            _ => return Ok(()),
        };
        let wrote = if self.tail_broken {
            Err(io::Error::other(
                "the spool segment after a failed write could not be replaced",
            ))
        } else {
            let mut p = Vec::with_capacity(1 + g.frames.len());
            p.push(TAG_GROUP);
            p.extend_from_slice(&g.frames);
            let mut framed = Vec::with_capacity(p.len() + HEADER);
            frame(&p, &mut framed);
            self.write(&framed)
        };
        let Err(error) = wrote else {
            return Ok(());
        };
        // Its places may have been handed to payloads still referring to them: never give
        // them to other records.
        self.tail_broken = true;
        let mut places = Vec::new();
        for u in g.undo.into_iter().rev() {
            match u {
                Undo::Append(id, bytes) => {
                    self.count(id.seg, bytes, false);
                    // Its number stays taken (the payload may go from memory).
                    self.marks_owed |= self.numbers.remove(id).1.is_some();
                    places.push(id);
                }
                Undo::Ack(id, bytes, number) => {
                    self.count(id.seg, bytes, true);
                    if let Some((call, seq)) = number {
                        self.numbers.add(Some(id), &call, seq, 0);
                    }
                }
            }
        }
        Err(GroupFailed { error, places })
    }

    /// Counts a record of `bytes` in segment `seg` as pending (`live`) or no longer; returns
    /// whether the segment then has nothing pending.
    fn count(&mut self, seg: u64, bytes: u64, live: bool) -> bool {
        if live {
            self.live_bytes += bytes;
        } else {
            self.live_bytes = self.live_bytes.saturating_sub(bytes);
        }
        match self.segs.get_mut(&seg) {
            Some(s) if live => {
                s.live += 1;
                s.live_bytes += bytes;
                false
            }
            Some(s) => {
                s.live = s.live.saturating_sub(1);
                s.live_bytes = s.live_bytes.saturating_sub(bytes);
                s.live == 0
            }
            None => false,
        }
    }

    fn write(&mut self, framed: &[u8]) -> io::Result<()> {
        #[cfg(test)]
        let fail = FAIL_WRITE.with(std::cell::Cell::get);
        #[cfg(not(test))]
        let fail = false;
        let mut cur = &*self.cur;
        let wrote = if fail {
            // A write cut short: part of the frame reaches the file.
            cur.write_all(&framed[..framed.len() / 2])
                .and(Err(io::Error::other("write failure injected by a test")))
        } else {
            cur.write_all(framed)
        };
        if let Err(e) = wrote {
            // Leave no half record behind us for the next append.
            let _ = cur.set_len(self.cur_len);
            let _ = cur.seek(SeekFrom::Start(self.cur_len));
            return Err(e);
        }
        self.cur_len += framed.len() as u64;
        Ok(())
    }

    /// Whether records were written that no finished sync covers.
    pub(crate) fn dirty(&self) -> bool {
        self.synced < (self.cur_id, self.cur_len)
    }

    /// Makes every record written so far durable (one `fsync` per segment written since the
    /// last sync), and deletes the segments that emptied, here and now.
    pub(crate) fn sync(&mut self) -> io::Result<()> {
        // Also while a background sync runs: what it covers is not durable yet.
        let mut synced = Ok(());
        if self.dirty() {
            let upto = (self.cur_id, self.cur_len);
            let new_segment = self.synced.0 < self.cur_id;
            self.synced = upto;
            self.begun = self.begun.max(upto);
            let closed = std::mem::take(&mut self.closed);
            synced = sync_files(
                closed.iter().map(|(_, f)| f).chain([&self.cur]),
                new_segment.then_some(&*self.dir),
            );
        }
        if synced.is_err() {
            self.sync_failed = true;
        }
        self.collect();
        self.unlink_now();
        synced
    }

    /// An fsync of what was written so far, to run on another thread while records go on
    /// being written (it also removes the files of segments found deletable); `None` if
    /// there is nothing to do. Hand it back to [`end_sync`](Self::end_sync) with what
    /// [`SyncJob::run`] returned.
    pub(crate) fn begin_sync(&mut self) -> Option<SyncJob> {
        let upto = (self.cur_id, self.cur_len);
        let from = self.begun;
        if from >= upto && self.unlink.is_empty() {
            return None;
        }
        let mut files = Vec::new();
        if from < upto {
            // The segments written since `from`: the one it is in (if closed since), later
            // closed ones, the current one.
            files.extend(
                self.closed
                    .iter()
                    .filter(|(id, _)| *id >= from.0)
                    .map(|(_, f)| f.clone()),
            );
            files.push(self.cur.clone());
        }
        self.begun = upto.max(from);
        Some(SyncJob {
            dir: self.dir.clone(),
            files,
            sync_dir: from.0 < upto.0,
            upto,
            done: self.collectable(),
            unlink: std::mem::take(&mut self.unlink),
        })
    }

    /// Applies a [`SyncJob`] that ran: its records count as synced, and the segments that
    /// had nothing pending when it began are deleted (their acks were written before it; the
    /// next sync removes their files).
    pub(crate) fn end_sync(&mut self, job: SyncJob, result: io::Result<()>) -> io::Result<()> {
        self.synced = self.synced.max(job.upto);
        let covered = self.synced.0;
        self.closed.retain(|(id, _)| *id >= covered);
        if let Err(e) = result {
            self.sync_failed = true;
            return Err(e);
        }
        // A failure or an owed mark since the job began keeps all.
        if self.may_delete() {
            self.delete(&job.done);
        }
        Ok(())
    }

    /// Whether a record was covered by an fsync (see `synced`).
    pub(crate) fn synced(&self, id: RecId) -> bool {
        (id.seg, id.off) < self.synced
    }

    /// The segments with nothing pending that are no longer appended to: deleted once the
    /// acks written so far are durable (none after a failed fsync).
    fn collectable(&self) -> Vec<u64> {
        if !self.may_delete() {
            return Vec::new();
        }
        let cur = self.cur_id;
        self.segs
            .iter()
            .filter(|&(&id, s)| id != cur && s.live == 0)
            .map(|(&id, _)| id)
            .collect()
    }

    /// Whether segments may be deleted at all: not after a failed fsync, not while a mark is
    /// owed, not while a group is open (its acks are not on disk yet).
    fn may_delete(&self) -> bool {
        !(self.sync_failed || self.marks_owed || self.group.is_some())
    }

    /// Deletes the segments with nothing pending that are no longer appended to (none after a
    /// failed fsync).
    fn collect(&mut self) {
        let done = self.collectable();
        self.delete(&done);
    }

    /// Deletes these segments, if they still have nothing pending (never the current one):
    /// they are forgotten now, and their files removed by the next sync.
    fn delete(&mut self, ids: &[u64]) {
        for &id in ids {
            if id != self.cur_id && self.segs.get(&id).is_some_and(|s| s.live == 0) {
                self.segs.remove(&id);
                self.unlink.push(id);
            }
        }
    }

    /// Removes the files of the deleted segments here.
    fn unlink_now(&mut self) {
        remove_segments(&self.dir, &std::mem::take(&mut self.unlink));
    }

    /// Marks a data record acknowledged; deletes its segment when nothing in it is left (at the
    /// next [`sync`](Self::sync), which makes the ack and any record written before it durable).
    /// `bytes` is what [`append`](Self::append) or recovery reported for it.
    pub(crate) fn ack(&mut self, id: RecId, bytes: u64) -> io::Result<()> {
        let empty = self.count(id.seg, bytes, false);
        let (number, mark) = self.numbers.remove(id);
        if let Some(g) = &mut self.group {
            g.undo.push(Undo::Ack(id, bytes, number));
        }
        // Written even when the record's segment is now empty: that segment is deleted only at
        // a sync, once this ack and whatever replaced the record are durable, and a crash
        // before then must not bring the record back. The record carried its call's highest
        // number: the mark carries it from now on.
        let framed = frame_all(mark.iter().chain([&Payload::Ack(id)]));
        if let Err(e) = self.put(&framed) {
            self.marks_owed |= mark.is_some();
            return Err(e);
        }
        if empty
            && self.group.is_none()
            && id.seg == self.cur_id
            && self.cur_len - self.cur_head >= SEGMENT_BYTES / 4
        {
            // The current segment holds nothing live: start afresh instead of growing it.
            return self.rotate();
        }
        Ok(())
    }

    /// Reads a data record back (for a body that was let go from memory).
    pub(crate) fn read(&self, id: RecId) -> io::Result<Vec<u8>> {
        if let Some(g) = &self.group
            && id.seg == self.cur_id
            && let Some(at) = id.off.checked_sub(g.start + GROUP_HEAD)
        {
            // A record of the open group, not yet written.
            let at = usize::try_from(at).unwrap_or(usize::MAX);
            return Self::data_of(g.frames.get(at..).unwrap_or_default());
        }
        let mut f = File::open(seg_path(&self.dir, id.seg))?;
        f.seek(SeekFrom::Start(id.off))?;
        let mut head = [0u8; HEADER];
        f.read_exact(&mut head)?;
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        if len > MAX_PAYLOAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bad spool frame",
            ));
        }
        let mut buf = vec![0u8; HEADER + len];
        buf[..HEADER].copy_from_slice(&head);
        f.read_exact(&mut buf[HEADER..])?;
        Self::data_of(&buf)
    }

    /// The body of the data record framed at the start of `buf`.
    fn data_of(buf: &[u8]) -> io::Result<Vec<u8>> {
        match read_frames(buf).0.first().map(|(_, p)| Payload::decode(p)) {
            Some(Some(Payload::Data { json, .. })) => Ok(json),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "spool record failed its CRC",
            )),
        }
    }

    /// Starts a new segment. It does not wait for the disk: the next sync fsyncs the old
    /// segment's last writes, the new one's marks and the directory, and a segment emptied
    /// is deleted only once a sync made its acks durable.
    fn rotate(&mut self) -> io::Result<()> {
        // The new file first: if it cannot be made, nothing changed (records keep going to
        // the current segment, which must not look like an old one and be deleted).
        let id = self.cur_id.checked_add(1).ok_or_else(ids_exhausted)?;
        let marks = self.numbers.rotate();
        let (f, head, marked) = new_segment(&self.dir, id, &marks)?;
        self.sync_failed |= !marked;
        self.marks_owed = false;
        let old = std::mem::replace(&mut self.cur, f);
        if self.synced < (self.cur_id, self.cur_len) {
            self.closed.push((self.cur_id, old));
        }
        self.cur_id = id;
        self.cur_len = head;
        self.cur_head = head;
        self.tail_broken = false;
        self.segs.insert(self.cur_id, Segment::default());
        Ok(())
    }
}

impl Drop for Spool {
    /// A clean stop makes the last acks durable and deletes the segments they emptied.
    fn drop(&mut self) {
        if let Err(e) = self.sync() {
            tracing::warn!(error = %e, "could not sync the spool at shutdown (its last acknowledged records may be sent again)");
        }
    }
}

#[cfg(test)]
impl Meta {
    /// A detail batch of one span of `call`, numbered `seq` (tests).
    pub(crate) fn detail(call: &str, seq: u32) -> Meta {
        Meta {
            core: false,
            is_final: false,
            late: false,
            seq,
            spans: 1,
            call_id: call.into(),
            gzip: false,
        }
    }
}

/// A copy of the spool directory `dir`, as a restart after a crash at this point would find
/// it (tests).
#[cfg(test)]
pub(crate) fn copy_of(dir: &Path) -> tempfile::TempDir {
    let copy = tempfile::tempdir().expect("temp dir");
    for e in fs::read_dir(dir).expect("spool dir") {
        let e = e.expect("dir entry");
        fs::copy(e.path(), copy.path().join(e.file_name())).expect("copy a segment");
    }
    copy
}

#[cfg(test)]
thread_local! {
    /// Set: every write of the spool on this thread fails half way (tests of the worker too).
    pub(crate) static FAIL_WRITE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// `fsync`: the file's data (and its metadata too when `all`). Tests can make it fail (no disk
/// here fails one on request).
fn fsync(f: &File, all: bool) -> io::Result<()> {
    #[cfg(test)]
    tests::FSYNCS.with(|n| n.set(n.get() + 1));
    #[cfg(test)]
    if tests::FAIL_FSYNC.with(std::cell::Cell::get) {
        return Err(io::Error::other("fsync failure injected by a test"));
    }
    if all { f.sync_all() } else { f.sync_data() }
}

/// Creates segment `id` with `marks` at its head (not fsynced: the caller's next sync makes
/// them and the file's name durable). Returns the file, the marks' length, and whether they
/// were written: when a write of them failed, the caller must delete no segment in this run
/// (the records that took those numbers are then their only durable trace).
fn new_segment(dir: &Path, id: u64, marks: &[Payload]) -> io::Result<(Arc<File>, u64, bool)> {
    let path = seg_path(dir, id);
    let mut f = File::options().create(true).append(true).open(&path)?;
    let marks = frame_all(marks);
    let mut head = marks.len() as u64;
    let mut written = true;
    #[cfg(test)]
    let fail = tests::FAIL_MARKS.with(std::cell::Cell::get);
    #[cfg(not(test))]
    let fail = false;
    let wrote = if fail {
        Err(io::Error::other("marks write failure injected by a test"))
    } else {
        f.write_all(&marks)
    };
    if !marks.is_empty()
        && let Err(e) = wrote
    {
        tracing::warn!(segment = id, error = %e,
            "could not write the batch numbers of pending calls to a new spool segment: no segment is deleted in this run (check the disk)");
        written = false;
        // A torn head would hide every record appended after it.
        if let Err(e) = f.set_len(0) {
            drop(f);
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        head = 0;
    }
    Ok((Arc::new(f), head, written))
}

fn ids_exhausted() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "spool segment ids are exhausted: a segment file is named 18446744073709551615.seg (remove it, or empty the directory)",
    )
}

fn remove_segments(dir: &Path, ids: &[u64]) {
    for &id in ids {
        if let Err(e) = fs::remove_file(seg_path(dir, id))
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(segment = id, error = %e, "could not delete an acknowledged spool segment");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::cell::Cell;

    thread_local! {
        /// Set: every `fsync` of the spool on this thread fails.
        pub(super) static FAIL_FSYNC: Cell<bool> = const { Cell::new(false) };
        /// Set: writing the marks at a new segment's head fails on this thread.
        pub(super) static FAIL_MARKS: Cell<bool> = const { Cell::new(false) };
        /// The `fsync`s of segment files tried on this thread so far.
        pub(super) static FSYNCS: Cell<u64> = const { Cell::new(0) };
    }

    fn fail_fsync(on: bool) {
        FAIL_FSYNC.with(|f| f.set(on));
    }

    fn meta(i: u32) -> Meta {
        Meta {
            core: i.is_multiple_of(3),
            is_final: i.is_multiple_of(5),
            late: i.is_multiple_of(7),
            seq: i,
            spans: i * 2,
            call_id: format!("call-{i}"),
            gzip: i.is_multiple_of(4),
        }
    }

    fn data(i: u32, len: usize) -> Payload {
        Payload::Data {
            meta: meta(i),
            json: vec![b'a' + (i % 26) as u8; len],
        }
    }

    fn segment(payloads: &[Payload]) -> Vec<u8> {
        frame_all(payloads)
    }

    fn decoded(buf: &[u8]) -> Vec<Payload> {
        read_frames(buf)
            .0
            .iter()
            .map(|(_, p)| Payload::decode(p).unwrap())
            .collect()
    }

    #[test]
    fn payloads_round_trip() {
        let ps = vec![
            data(0, 0),
            data(1, 100),
            Payload::Ack(RecId { seg: 3, off: 99 }),
            Payload::Mark {
                call_id: "call-x".into(),
                next: 41,
            },
        ];
        let seg = segment(&ps);
        assert_eq!(decoded(&seg), ps);
        assert_eq!(read_frames(&seg).1, seg.len());
    }

    #[test]
    fn torn_tail_keeps_the_prefix() {
        let ps: Vec<Payload> = (0..4).map(|i| data(i, 50)).collect();
        let seg = segment(&ps);
        let cut = seg.len() - 10;
        let (frames, ok) = read_frames(&seg[..cut]);
        assert_eq!(frames.len(), 3);
        assert!(ok < cut);
    }

    #[test]
    fn acked_records_are_not_replayed() {
        let a = segment(&[data(1, 10), data(2, 10)]);
        let second = read_frames(&a).0[1].0;
        let b = segment(&[Payload::Ack(RecId { seg: 7, off: 0 })]);
        let (recs, valid, _) = recover(&[(7, a.clone()), (8, b)]);
        assert_eq!(recs.len(), 1);
        assert_eq!(
            recs[0].id,
            RecId {
                seg: 7,
                off: second
            }
        );
        assert_eq!(recs[0].meta, meta(2));
        assert_eq!(valid[0], a.len());
    }

    /// A call's next batch number counts every number it wrote: acknowledged records and
    /// marks too. Calls with nothing pending, and summaries, are not carried.
    #[test]
    fn next_batch_numbers_count_acknowledged_records_and_marks() {
        let d = |meta: Meta| Payload::Data { meta, json: vec![] };
        let a = segment(&[
            d(Meta::detail("a", 2)),
            d(Meta::detail("a", 5)),
            d(Meta::detail("b", 1)),
            d(Meta::detail("e", 0)),
            d(Meta::detail("e", 6)),
            d(Meta {
                core: true,
                ..Meta::detail("f", 9)
            }),
        ]);
        let off: Vec<u64> = read_frames(&a).0.iter().map(|(o, _)| *o).collect();
        let ack = |i: usize| {
            Payload::Ack(RecId {
                seg: 0,
                off: off[i],
            })
        };
        let mark = |call: &str, next| Payload::Mark {
            call_id: call.into(),
            next,
        };
        let b = segment(&[mark("a", 8), mark("b", 4), ack(1), ack(2), ack(4)]);
        let (recs, _, next) = recover(&[(0, a), (1, b)]);
        assert_eq!(recs.len(), 3);
        let mut next: Vec<(String, u32)> = next.into_iter().collect();
        next.sort_unstable();
        assert_eq!(next, [("a".into(), 8), ("e".into(), 7)]);
    }

    /// A spool in `dir` where call `c`'s batch 0 is pending in segment 0 (filled by an
    /// acknowledged record) and its batch 4 started segment 1 and was acknowledged.
    fn batch_4_acked_in_segment_1(dir: &Path) -> Spool {
        let (mut s, _) = Spool::open(dir, 1 << 30).unwrap();
        s.append(&Meta::detail("c", 0), b"{}").unwrap();
        let (rf, bf) = s
            .append(&meta(1), &vec![b'x'; SEGMENT_BYTES as usize])
            .unwrap();
        s.ack(rf, bf).unwrap();
        let (r4, b4) = s.append(&Meta::detail("c", 4), b"{}").unwrap();
        assert_eq!(r4.seg, 1);
        s.ack(r4, b4).unwrap();
        s
    }

    /// A pending call's numbers outlive the segment that held its highest, acknowledged
    /// batch: the segment after it opens with the call's mark, carried on at each start.
    #[test]
    fn a_calls_next_number_outlives_the_segment_of_its_acknowledged_batch() {
        let dir = tempfile::tempdir().unwrap();
        let big = vec![b'x'; SEGMENT_BYTES as usize];
        let mut s = batch_4_acked_in_segment_1(dir.path());
        // Segment 1 fills with acknowledged records: it rotates and is deleted.
        let (rf, bf) = s.append(&meta(2), &big).unwrap();
        s.ack(rf, bf).unwrap();
        s.sync().unwrap();
        assert!(!seg_path(dir.path(), 1).exists());
        drop(s);
        for _restart in 0..2 {
            let (s, o) = Spool::open(dir.path(), 1 << 30).unwrap();
            let left: Vec<Meta> = o.records.iter().map(|r| r.meta.clone()).collect();
            assert_eq!(left, [Meta::detail("c", 0)]);
            assert_eq!(s.numbers.pending(), [("c".into(), 5)]);
        }
    }

    #[test]
    fn garbage_payloads_decode_to_none() {
        assert_eq!(Payload::decode(&[]), None);
        assert_eq!(Payload::decode(&[TAG_ACK, 1, 2]), None);
        assert_eq!(Payload::decode(&[TAG_DETAIL, 0, 1]), None);
        assert_eq!(Payload::decode(&[9, 9, 9]), None);
        // A call id length past the end.
        assert_eq!(
            Payload::decode(&[TAG_CORE, 0, 0, 0, 0, 0, 0, 0, 0, 0, 255, 255]),
            None
        );
    }

    #[test]
    fn spool_on_disk_replays_deletes_and_cuts_torn_tails() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, o) = Spool::open(dir.path(), 1 << 20).unwrap();
        assert!(o.records.is_empty());
        let (a, bytes_a) = s.append(&meta(1), b"{\"a\":1}").unwrap();
        let _b = s.append(&meta(2), b"{\"b\":2}").unwrap();
        s.sync().unwrap();
        assert_eq!(s.read(a).unwrap(), b"{\"a\":1}");
        s.ack(a, bytes_a).unwrap();
        drop(s);
        // A torn write at the end of the segment.
        let seg = seg_path(dir.path(), 0);
        let mut f = File::options().append(true).open(&seg).unwrap();
        f.write_all(&[40, 0, 0, 0, 1, 2]).unwrap();
        drop(f);
        let (mut s, o) = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(o.corrupt_tails, 1);
        assert_eq!(o.records.len(), 1);
        assert_eq!(s.read(o.records[0].id).unwrap(), b"{\"b\":2}");
        assert_eq!(o.records[0].meta, meta(2));
        let r = &o.records[0];
        s.ack(r.id, r.bytes).unwrap();
        assert_eq!(s.live_bytes(), 0);
        // Segment 0 has nothing left and goes at the next sync; the new one stays.
        s.sync().unwrap();
        assert!(!seg.exists());
        drop(s);
        let (_s, o) = Spool::open(dir.path(), 1 << 20).unwrap();
        assert!(o.records.is_empty());
        assert_eq!(o.corrupt_tails, 0);
    }

    /// A record rewritten elsewhere (a renumbered final, a split's halves) is acknowledged
    /// right after its replacement is written: the replaced record's segment must outlive
    /// that write until it is durable, or a power loss in between could leave neither.
    #[test]
    fn a_segment_emptied_before_a_sync_is_deleted_by_the_sync() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::open(dir.path(), 1 << 20).unwrap();
        s.append(&meta(1), b"{\"a\":1}").unwrap();
        s.sync().unwrap();
        drop(s);
        // Reopened: the record is in segment 0, new records go to segment 1.
        let (mut s, o) = Spool::open(dir.path(), 1 << 20).unwrap();
        let old = &o.records[0];
        assert_eq!(old.id.seg, 0);
        s.append(&meta(1), b"{\"a\":2}").unwrap();
        s.ack(old.id, old.bytes).unwrap();
        let seg0 = seg_path(dir.path(), 0);
        assert!(seg0.exists(), "deleted before its replacement was durable");
        s.sync().unwrap();
        assert!(!seg0.exists());
        drop(s);
        let (_s, o) = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(o.records.len(), 1);
    }

    /// Record 1 written in segment 0 by one run; the next run writes record 2, acks record 1,
    /// and stops (no sync, no drop) with segment 0 left for the next sync.
    fn crash_after_an_ack(dir: &Path) {
        let (mut s, _) = Spool::open(dir, 1 << 20).unwrap();
        s.append(&meta(1), b"{\"a\":1}").unwrap();
        drop(s);
        let (mut s, o) = Spool::open(dir, 1 << 20).unwrap();
        let old = &o.records[0];
        s.append(&meta(2), b"{\"a\":2}").unwrap();
        s.ack(old.id, old.bytes).unwrap();
        std::mem::forget(s);
    }

    /// The process stops (no sync, no drop) after a record was acked and its segment left for
    /// the next sync: the ack itself is in the current segment, so the record does not come
    /// back beside its replacement (a renumbered final would then share a number).
    #[test]
    fn a_record_acked_before_a_crash_does_not_come_back() {
        let dir = tempfile::tempdir().unwrap();
        crash_after_an_ack(dir.path());
        let (_s, o) = Spool::open(dir.path(), 1 << 20).unwrap();
        let left: Vec<Meta> = o.records.iter().map(|r| r.meta.clone()).collect();
        assert_eq!(left, [meta(2)]);
        assert!(
            !seg_path(dir.path(), 0).exists(),
            "an emptied segment is deleted at open"
        );
    }

    /// A spool in `dir` whose segment 0 holds two records of half a segment each, both acked;
    /// the third record (returned) started segment 1.
    fn segment_0_acked(dir: &Path) -> (Spool, RecId) {
        let big = vec![b'x'; (SEGMENT_BYTES / 2 + 1) as usize];
        let (mut s, _) = Spool::open(dir, 1 << 30).unwrap();
        let (r1, b1) = s.append(&meta(1), &big).unwrap();
        let (r2, b2) = s.append(&meta(2), &big).unwrap();
        let (r3, _) = s.append(&meta(3), b"{}").unwrap();
        assert_eq!((r1.seg, r2.seg, r3.seg), (0, 0, 1));
        s.ack(r1, b1).unwrap();
        s.ack(r2, b2).unwrap();
        (s, r3)
    }

    /// Across a rotate at run time: a full segment's records acked from the next segment stay
    /// acked after a crash before the sync, and the segment goes at the sync.
    #[test]
    fn a_rotated_segment_goes_at_the_sync_after_its_last_ack() {
        let dir = tempfile::tempdir().unwrap();
        let big = vec![b'x'; (SEGMENT_BYTES / 2 + 1) as usize];
        let (mut s, _) = segment_0_acked(dir.path());
        let seg0 = seg_path(dir.path(), 0);
        assert!(seg0.exists(), "deleted before the sync");
        s.sync().unwrap();
        assert!(!seg0.exists());
        drop(s);
        // Again, stopping before the sync: the acks are in segment 1.
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::open(dir.path(), 1 << 30).unwrap();
        let (r1, b1) = s.append(&meta(1), &big).unwrap();
        s.append(&meta(2), &big).unwrap();
        s.append(&meta(3), b"{}").unwrap();
        s.ack(r1, b1).unwrap();
        std::mem::forget(s);
        let (_s, o) = Spool::open(dir.path(), 1 << 30).unwrap();
        let left: Vec<Meta> = o.records.iter().map(|r| r.meta.clone()).collect();
        assert_eq!(left, [meta(2), meta(3)]);
    }

    /// A rotate that cannot create the next file changes nothing: records keep going to the
    /// current segment, which is not taken for an old, empty one and deleted.
    #[test]
    fn a_failed_rotate_loses_no_record() {
        let dir = tempfile::tempdir().unwrap();
        let big = vec![b'x'; (SEGMENT_BYTES / 4 + 1) as usize];
        let (mut s, _) = Spool::open(dir.path(), 1 << 30).unwrap();
        let (r1, b1) = s.append(&meta(1), &big).unwrap();
        // The next segment's name is taken by a directory: its file cannot be created.
        fs::create_dir(seg_path(dir.path(), 1)).unwrap();
        // The ack empties the current segment, which then rotates, and fails.
        assert!(s.ack(r1, b1).is_err());
        let (r2, _) = s.append(&meta(2), b"{}").unwrap();
        assert_eq!(r2.seg, 0);
        s.sync().unwrap();
        drop(s);
        fs::remove_dir(seg_path(dir.path(), 1)).unwrap();
        let (_s, o) = Spool::open(dir.path(), 1 << 30).unwrap();
        let left: Vec<Meta> = o.records.iter().map(|r| r.meta.clone()).collect();
        assert_eq!(left, [meta(2)]);
    }

    /// After a failed fsync a later one may report success for data that never reached the
    /// disk (Linux forgets a writeback error once reported): acks written before it may be
    /// lost, so no segment is deleted for the rest of the run. The next start finds the acks
    /// that did reach the disk and deletes what they emptied.
    #[test]
    fn after_a_failed_fsync_no_segment_is_deleted_in_the_run() {
        let dir = tempfile::tempdir().unwrap();
        let big = vec![b'x'; (SEGMENT_BYTES / 2 + 1) as usize];
        let (mut s, r3) = segment_0_acked(dir.path());
        fail_fsync(true);
        assert!(s.sync().is_err());
        fail_fsync(false);
        let seg0 = seg_path(dir.path(), 0);
        assert!(seg0.exists(), "deleted on the word of a failed fsync");
        // Later fsyncs succeed, and segment 1 fills and rotates: still nothing is deleted.
        s.append(&meta(4), b"{}").unwrap();
        s.sync().unwrap();
        assert!(seg0.exists(), "deleted at a sync after a failed one");
        let (r5, b5) = s.append(&meta(5), &big).unwrap();
        let (r6, b6) = s.append(&meta(6), &big).unwrap();
        let (r7, _) = s.append(&meta(7), b"{}").unwrap();
        assert_eq!((r5.seg, r6.seg, r7.seg), (1, 1, 2));
        s.ack(r5, b5).unwrap();
        s.ack(r6, b6).unwrap();
        s.ack(r3, 0).unwrap();
        s.sync().unwrap();
        drop(s);
        assert!(seg0.exists() && seg_path(dir.path(), 1).exists());
        // The next run: the acks are on disk, the emptied segment goes (segment 1 still holds
        // record 4).
        let (_s, o) = Spool::open(dir.path(), 1 << 30).unwrap();
        let left: Vec<Meta> = o.records.iter().map(|r| r.meta.clone()).collect();
        assert_eq!(left, [meta(4), meta(7)]);
        assert!(!seg0.exists() && seg_path(dir.path(), 1).exists());
    }

    /// A crashed run left acks that may be in the page cache only. If they cannot be made
    /// durable at the next start, the spool still opens (the processor works without
    /// deleting), keeps every segment, and deletes none for the run.
    #[test]
    fn an_fsync_failure_at_open_keeps_every_segment() {
        let dir = tempfile::tempdir().unwrap();
        crash_after_an_ack(dir.path());
        let seg0 = seg_path(dir.path(), 0);
        fail_fsync(true);
        let (mut s, o) = Spool::open(dir.path(), 1 << 20).unwrap();
        fail_fsync(false);
        let left: Vec<Meta> = o.records.iter().map(|r| r.meta.clone()).collect();
        assert_eq!(left, [meta(2)]);
        assert!(
            seg0.exists(),
            "deleted on the word of acks that could not be synced"
        );
        s.append(&meta(3), b"{}").unwrap();
        s.sync().unwrap();
        drop(s);
        assert!(seg0.exists(), "deleted later in the run");
        let (_s, o) = Spool::open(dir.path(), 1 << 20).unwrap();
        let left: Vec<Meta> = o.records.iter().map(|r| r.meta.clone()).collect();
        assert_eq!(left, [meta(2), meta(3)]);
        assert!(!seg0.exists());
    }

    /// A new segment whose marks could not be made durable (their fsync failed) or not even
    /// written at its head deletes no segment for the rest of the run: the one holding a
    /// pending call's highest, acknowledged batch stays, and the next start still finds the
    /// number.
    #[test]
    fn marks_that_failed_to_reach_the_disk_keep_every_segment() {
        for write_fails in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let big = vec![b'x'; SEGMENT_BYTES as usize];
            let mut s = batch_4_acked_in_segment_1(dir.path());
            let (rf, bf) = s.append(&meta(2), &big).unwrap();
            s.sync().unwrap();
            // Segment 1 is full: the next record starts segment 2, with marks.
            FAIL_MARKS.with(|f| f.set(write_fails));
            let (r, _) = s.append(&Meta::detail("d", 0), b"{}").unwrap();
            FAIL_MARKS.with(|f| f.set(false));
            assert_eq!(r.seg, 2);
            assert_eq!(
                r.off == 0,
                write_fails,
                "the segment starts without its marks"
            );
            s.ack(rf, bf).unwrap();
            if !write_fails {
                fail_fsync(true);
                assert!(s.sync().is_err());
                fail_fsync(false);
            }
            s.sync().unwrap();
            assert!(
                seg_path(dir.path(), 1).exists(),
                "deleted while the only durable trace of batch 4"
            );
            drop(s);
            let (s, o) = Spool::open(dir.path(), 1 << 30).unwrap();
            assert_eq!(s.numbers.pending(), [("c".into(), 5), ("d".into(), 1)]);
            assert_eq!(o.records.len(), 2);
        }
    }

    /// Records written as a group keep their own places: read back before and after the group
    /// is written, acknowledged one by one, replayed after a restart; a group cut short
    /// brings back none of its records and none of its acks.
    #[test]
    fn a_group_reaches_the_disk_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::open(dir.path(), 1 << 20).unwrap();
        let (r1, b1) = s.append(&Meta::detail("c", 0), b"{\"whole\":1}").unwrap();
        s.sync().unwrap();
        let before = fs::metadata(seg_path(dir.path(), 0)).unwrap().len();
        s.begin_group();
        let (a, _) = s.append(&Meta::detail("c", 0), b"{\"half\":1}").unwrap();
        let (b, bb) = s.append(&Meta::detail("c", 1), b"{\"half\":2}").unwrap();
        s.ack(r1, b1).unwrap();
        assert_eq!(s.read(b).unwrap(), b"{\"half\":2}");
        s.end_group().unwrap();
        s.sync().unwrap();
        let after = fs::metadata(seg_path(dir.path(), 0)).unwrap().len();
        assert_eq!(s.read(a).unwrap(), b"{\"half\":1}");
        assert_eq!(s.read(b).unwrap(), b"{\"half\":2}");
        s.ack(b, bb).unwrap();
        drop(s);
        let bytes = fs::read(seg_path(dir.path(), 0)).unwrap();
        let seqs = |o: &Opened| o.records.iter().map(|r| r.meta.seq).collect::<Vec<_>>();
        let (_s, o) = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(seqs(&o), [0]);
        assert_eq!(o.records[0].id, a);
        // The group's frame torn anywhere: the spool as it was before it.
        for cut in [before + 1, before + 9, after - 30] {
            let d = tempfile::tempdir().unwrap();
            fs::write(seg_path(d.path(), 0), &bytes[..cut as usize]).unwrap();
            let (_s, o) = Spool::open(d.path(), 1 << 20).unwrap();
            assert_eq!(o.records.len(), 1, "cut at {cut}");
            assert_eq!(o.records[0].id, r1, "cut at {cut}");
        }
    }

    /// A sync while a group is open deletes no segment: the acks that emptied it are still in
    /// memory.
    #[test]
    fn a_sync_inside_a_group_deletes_nothing_it_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let big = vec![b'x'; SEGMENT_BYTES as usize];
        let (mut s, _) = Spool::open(dir.path(), 1 << 30).unwrap();
        let (r1, b1) = s.append(&Meta::detail("c", 0), &big).unwrap();
        s.append(&Meta::detail("d", 0), b"{}").unwrap();
        s.begin_group();
        s.append(&Meta::detail("c", 0), b"{}").unwrap();
        s.ack(r1, b1).unwrap();
        s.sync().unwrap();
        assert!(seg_path(dir.path(), 0).exists());
        s.end_group().unwrap();
        s.sync().unwrap();
        assert!(!seg_path(dir.path(), 0).exists());
    }

    /// A group that fails to be written leaves no trace, and its records' places are never
    /// given to later records (their acks would acknowledge those): the next record starts a
    /// new segment.
    #[test]
    fn a_failed_group_gives_its_places_to_no_other_record() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::open(dir.path(), 1 << 20).unwrap();
        let (r1, b1) = s.append(&Meta::detail("c", 0), b"{}").unwrap();
        s.begin_group();
        let (a, _) = s.append(&Meta::detail("c", 1), b"{}").unwrap();
        s.ack(r1, b1).unwrap();
        super::FAIL_WRITE.with(|f| f.set(true));
        let failed = s.end_group().unwrap_err();
        super::FAIL_WRITE.with(|f| f.set(false));
        assert_eq!(failed.places, [a]);
        let (r2, _) = s.append(&Meta::detail("d", 0), b"{}").unwrap();
        assert_eq!(r2.seg, 1);
        // The record the group was to replace is pending again (its ack was in the group).
        s.sync().unwrap();
        drop(s);
        let (s, o) = Spool::open(dir.path(), 1 << 20).unwrap();
        let ids: Vec<RecId> = o.records.iter().map(|r| r.id).collect();
        assert_eq!(ids, [r1, r2]);
        // Batch 1 went from memory: its number stays taken.
        assert_eq!(s.numbers.pending(), [("c".into(), 2), ("d".into(), 1)]);
    }

    /// The ack of the last pending record carrying a call's highest number writes a mark
    /// beside it: the number outlives that record's segment even when the current segment
    /// opened while the record was still pending (so without a mark for the call).
    #[test]
    fn acknowledging_a_calls_highest_batch_leaves_a_mark() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::open(dir.path(), 1 << 30).unwrap();
        let (r4, b4) = s.append(&Meta::detail("c", 4), b"{}").unwrap();
        let (rf, bf) = s
            .append(&meta(3), &vec![b'x'; SEGMENT_BYTES as usize])
            .unwrap();
        let (r0, _) = s.append(&Meta::detail("c", 0), b"{}").unwrap();
        assert_eq!((r4.seg, r0.seg), (0, 1));
        s.ack(rf, bf).unwrap();
        s.ack(r4, b4).unwrap();
        s.sync().unwrap();
        assert!(!seg_path(dir.path(), 0).exists());
        drop(s);
        let (s, _) = Spool::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(s.numbers.pending(), [("c".into(), 5)]);
    }

    /// A spool where call `c`'s batch 5 is pending in segment 0 and its batch 6, its highest,
    /// in segment 1 beside an acknowledged summary; segment 2 is the current one.
    fn batch_6_in_segment_1(dir: &Path) -> (Spool, RecId, u64) {
        let big = vec![b'x'; SEGMENT_BYTES as usize];
        let (mut s, _) = Spool::open(dir, 1 << 30).unwrap();
        s.append(&Meta::detail("c", 5), b"{}").unwrap();
        s.append(&meta(3), &big).unwrap();
        let (r6, b6) = s.append(&Meta::detail("c", 6), b"{}").unwrap();
        let (rf, bf) = s.append(&meta(3), &big).unwrap();
        let (r, _) = s.append(&Meta::detail("d", 0), b"{}").unwrap();
        assert_eq!((r6.seg, r.seg), (1, 2));
        s.ack(rf, bf).unwrap();
        s.sync().unwrap();
        (s, r6, b6)
    }

    /// A mark that could not be written (the ack beside it failed, or the record that took a
    /// higher number) deletes no segment until a new segment's head carries the number.
    #[test]
    fn a_mark_lost_to_a_failed_write_keeps_every_segment_until_the_next_head() {
        let next_of_c = |dir: &Path| {
            let copy = super::copy_of(dir);
            Spool::open(copy.path(), 1 << 30).unwrap().0.next_seq("c")
        };
        // The ack of batch 6, and its mark, fail to be written.
        let dir = tempfile::tempdir().unwrap();
        let (mut s, r6, b6) = batch_6_in_segment_1(dir.path());
        super::FAIL_WRITE.with(|f| f.set(true));
        assert!(s.ack(r6, b6).is_err());
        super::FAIL_WRITE.with(|f| f.set(false));
        s.sync().unwrap();
        assert!(seg_path(dir.path(), 1).exists());
        assert_eq!(next_of_c(dir.path()), Some(7));
        // The next record starts a segment whose head carries the number: then it may go.
        let (r, _) = s.append(&Meta::detail("d", 1), b"{}").unwrap();
        assert_eq!(r.seg, 3);
        s.sync().unwrap();
        assert!(!seg_path(dir.path(), 1).exists());
        assert_eq!(next_of_c(dir.path()), Some(7));
        // Batch 9's record fails to be written (it goes from memory); batch 6 is acknowledged.
        let dir = tempfile::tempdir().unwrap();
        let (mut s, r6, b6) = batch_6_in_segment_1(dir.path());
        super::FAIL_WRITE.with(|f| f.set(true));
        assert!(s.append(&Meta::detail("c", 9), b"{}").is_err());
        super::FAIL_WRITE.with(|f| f.set(false));
        s.ack(r6, b6).unwrap();
        s.sync().unwrap();
        assert!(seg_path(dir.path(), 1).exists());
        s.append(&Meta::detail("d", 1), b"{}").unwrap();
        s.sync().unwrap();
        assert!(!seg_path(dir.path(), 1).exists());
        assert_eq!(next_of_c(dir.path()), Some(10));
    }

    /// A segment id that cannot be followed is refused with what to do, not a panic.
    #[test]
    fn an_exhausted_segment_id_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(seg_path(dir.path(), u64::MAX), b"").unwrap();
        let e = Spool::open(dir.path(), 1 << 20).unwrap_err();
        assert!(e.to_string().contains("remove it"), "{e}");
    }

    /// A new segment opens with a mark only for the calls whose highest number no pending
    /// record carries: a spool of many pending calls does not copy them all into every
    /// segment.
    #[test]
    fn a_segment_opens_with_marks_only_where_no_pending_record_carries_the_number() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::open(dir.path(), 1 << 30).unwrap();
        for i in 0..100 {
            s.append(&Meta::detail(&format!("c{i}"), 3), b"{}").unwrap();
        }
        // `x`'s batch 1 is pending, its batch 2 acknowledged: its number rides on a mark.
        s.append(&Meta::detail("x", 1), b"{}").unwrap();
        let (r, b) = s.append(&Meta::detail("x", 2), b"{}").unwrap();
        s.ack(r, b).unwrap();
        // A summary (no batch number) fills segment 0; the next record starts segment 1.
        assert!(meta(3).core);
        let (rf, bf) = s
            .append(&meta(3), &vec![b'x'; SEGMENT_BYTES as usize])
            .unwrap();
        s.ack(rf, bf).unwrap();
        let (r, _) = s.append(&Meta::detail("y", 0), b"{}").unwrap();
        assert_eq!(r.seg, 1);
        let head = fs::read(seg_path(dir.path(), 1)).unwrap();
        let marks: Vec<Payload> = decoded(&head[..s.cur_head as usize]);
        assert_eq!(
            marks,
            [Payload::Mark {
                call_id: "x".into(),
                next: 3
            }]
        );
    }

    /// A zero-filled tail (a torn write after a power loss) is cut off, not read as frames.
    #[test]
    fn zero_filled_tail_is_not_frames() {
        let mut buf = Vec::new();
        frame(b"x", &mut buf);
        let valid = buf.len();
        buf.extend_from_slice(&[0u8; 64]);
        let (frames, ok) = read_frames(&buf);
        assert_eq!(frames.len(), 1);
        assert_eq!(ok, valid);
    }

    proptest! {
        /// Any truncation or corruption of a segment never panics and yields a prefix of the
        /// records written.
        #[test]
        fn damage_yields_a_prefix(
            lens in prop::collection::vec(0usize..300, 1..20),
            cut in any::<prop::sample::Index>(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..4),
        ) {
            let ps: Vec<Payload> = lens.iter().enumerate().map(|(i, l)| data(i as u32, *l)).collect();
            let mut seg = segment(&ps);
            let n = cut.index(seg.len() + 1);
            seg.truncate(n);
            for (at, x) in &flips {
                if !seg.is_empty() {
                    let i = at.index(seg.len());
                    seg[i] ^= x;
                }
            }
            let (frames, ok) = read_frames(&seg);
            prop_assert!(ok <= seg.len());
            let got: Vec<Option<Payload>> = frames.iter().map(|(_, p)| Payload::decode(p)).collect();
            prop_assert!(got.len() <= ps.len());
            for (g, want) in got.iter().zip(&ps) {
                prop_assert_eq!(g.as_ref(), Some(want));
            }
            let (recs, _, _) = recover(&[(0, seg.clone())]);
            prop_assert_eq!(recs.len(), got.len());
        }
    }

    /// A sync begun in the background covers what was written before it began, and only
    /// once it ended: a record written meanwhile waits for the next one.
    #[test]
    fn a_background_sync_covers_what_was_written_before_it_began() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::open(dir.path(), 1 << 20).unwrap();
        assert!(s.begin_sync().is_none(), "nothing written");
        let (r1, _) = s.append(&Meta::detail("c", 0), b"{}").unwrap();
        assert!(!s.synced(r1));
        let job = s.begin_sync().expect("r1 to sync");
        assert!(s.begin_sync().is_none(), "r1 is being synced");
        let (r2, _) = s.append(&Meta::detail("c", 1), b"{}").unwrap();
        assert!(!s.synced(r1), "synced before its fsync ended");
        let result = job.run();
        s.end_sync(job, result).unwrap();
        assert!(s.synced(r1));
        assert!(!s.synced(r2));
        assert!(s.dirty());
        let job = s.begin_sync().expect("r2 to sync");
        let result = job.run();
        s.end_sync(job, result).unwrap();
        assert!(s.synced(r2) && !s.dirty());
    }

    /// A sync here while a background one runs fsyncs again: what the running one covers is
    /// not durable yet, and a rotation must not take it to be.
    #[test]
    fn a_sync_while_a_background_sync_runs_covers_its_records_too() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::open(dir.path(), 1 << 20).unwrap();
        let (r, _) = s.append(&Meta::detail("c", 0), b"{}").unwrap();
        let job = s.begin_sync().unwrap();
        assert!(s.dirty());
        fail_fsync(true);
        let here = s.sync();
        fail_fsync(false);
        assert!(here.is_err(), "the sync here did not fsync");
        assert!(s.synced(r));
        let result = job.run();
        s.end_sync(job, result).unwrap();
    }

    /// Segments with nothing pending when a background sync began are deleted when it ends
    /// (it made their acks durable), not before, and their files removed by the next sync,
    /// on its thread; after a failed one, none is.
    #[test]
    fn a_background_sync_deletes_the_segments_its_acks_emptied_once_it_ended() {
        for fails in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let (mut s, _) = Spool::open(dir.path(), 1 << 30).unwrap();
            let big = vec![b'x'; SEGMENT_BYTES as usize];
            let (r0, b0) = s.append(&Meta::detail("c", 0), &big).unwrap();
            s.sync().unwrap();
            let (r1, _) = s.append(&Meta::detail("c", 1), b"{}").unwrap();
            assert_eq!((r0.seg, r1.seg), (0, 1));
            s.ack(r0, b0).unwrap();
            let job = s.begin_sync().unwrap();
            assert!(job.unlink.is_empty(), "deleted before its ack is durable");
            let result = if fails {
                Err(io::Error::other("fsync failure injected by a test"))
            } else {
                job.run()
            };
            assert_eq!(s.end_sync(job, result).is_err(), fails);
            let seg0 = seg_path(dir.path(), 0);
            assert!(seg0.exists(), "its file goes with the next sync");
            // Nothing was written since: the next sync only removes files.
            let next = s.begin_sync();
            assert_eq!(next.is_some(), !fails);
            if let Some(job) = next {
                assert!(job.files.is_empty());
                let result = job.run();
                s.end_sync(job, result).unwrap();
            }
            assert_eq!(seg0.exists(), fails);
            // A later fsync may report success for what the failed one lost.
            s.sync().unwrap();
            assert_eq!(seg0.exists(), fails);
            assert!(s.synced(r1), "sent all the same after a failed fsync");
        }
    }

    /// A segment listed but gone when it is opened (an earlier spool's fsync thread in the
    /// same process removing it; here a dangling link) is skipped: the spool opens, numbers
    /// its new segment past it, and still deletes what is acknowledged.
    #[cfg(unix)]
    #[test]
    fn a_segment_removed_while_the_spool_opens_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::open(dir.path(), 1 << 20).unwrap();
        s.append(&meta(1), b"{}").unwrap();
        drop(s);
        std::os::unix::fs::symlink(dir.path().join("gone"), seg_path(dir.path(), 5)).unwrap();
        let (mut s, o) = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(o.records.len(), 1);
        let (r, _) = s.append(&meta(2), b"{}").unwrap();
        assert_eq!(r.seg, 6, "numbered past the segment that went");
        s.ack(o.records[0].id, o.records[0].bytes).unwrap();
        s.sync().unwrap();
        assert!(!seg_path(dir.path(), 0).exists(), "deletes as usual");
    }

    /// A new segment's name is made durable by the sync that covers its records: a directory
    /// that cannot be fsynced (here: removed under the spool) fails the sync, and no segment
    /// is deleted after it.
    #[test]
    fn a_sync_that_cannot_fsync_the_directory_of_a_new_segment_fails() {
        let dir = tempfile::tempdir().unwrap();
        let spool_dir = dir.path().join("spool");
        let (mut s, _) = Spool::open(&spool_dir, 1 << 30).unwrap();
        let big = vec![b'x'; SEGMENT_BYTES as usize];
        let (r0, b0) = s.append(&Meta::detail("c", 0), &big).unwrap();
        s.sync().unwrap();
        let (r1, _) = s.append(&Meta::detail("c", 1), b"{}").unwrap();
        assert_eq!(r1.seg, 1);
        s.ack(r0, b0).unwrap();
        fs::remove_dir_all(&spool_dir).unwrap();
        let job = s.begin_sync().unwrap();
        let result = job.run();
        assert!(result.is_err(), "the new segment's name is not durable");
        assert!(s.end_sync(job, result).is_err());
        assert!(s.synced(r1), "sent all the same, as after a failed fsync");
        assert!(
            s.segs.contains_key(&0) && s.unlink.is_empty(),
            "segment 0 deleted after it"
        );
    }

    /// A rotation does not fsync (on the worker thread, it would wait for the disk): the
    /// next sync fsyncs the old segment's last records with the new segment's, and what a
    /// background sync covers is synced only once it ended, in either segment.
    #[test]
    fn a_rotation_leaves_its_fsyncs_to_the_next_sync() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::open(dir.path(), 1 << 30).unwrap();
        let big = vec![b'x'; SEGMENT_BYTES as usize];
        let fsyncs = || FSYNCS.with(Cell::get);
        let (r0, _) = s.append(&Meta::detail("c", 0), &big).unwrap();
        let before = fsyncs();
        let (r1, _) = s.append(&Meta::detail("c", 1), b"{}").unwrap();
        assert_eq!((r0.seg, r1.seg), (0, 1), "the second record rotated");
        assert_eq!(fsyncs(), before, "the rotation fsynced");
        assert!(!s.synced(r0) && !s.synced(r1));
        let job = s.begin_sync().unwrap();
        assert!(job.sync_dir, "the new segment's name is made durable");
        let result = job.run();
        assert_eq!(fsyncs(), before + 2, "both segments fsynced");
        assert!(!s.synced(r0), "synced before the fsync ended");
        s.end_sync(job, result).unwrap();
        assert!(s.synced(r0) && s.synced(r1) && !s.dirty());
        assert!(s.closed.is_empty(), "the old segment's handle is let go");
        // The next rotation, with the sync here: the same, and a failed fsync of the old
        // segment does not leave the new one unsynced.
        let (r2, _) = s.append(&Meta::detail("c", 2), &big).unwrap();
        let (r3, _) = s.append(&Meta::detail("c", 3), b"{}").unwrap();
        assert_eq!((r2.seg, r3.seg), (1, 2));
        let before = fsyncs();
        fail_fsync(true);
        let here = s.sync();
        fail_fsync(false);
        assert!(here.is_err());
        assert_eq!(fsyncs(), before + 2, "both segments tried");
        assert!(s.synced(r3) && s.closed.is_empty());
    }
}
