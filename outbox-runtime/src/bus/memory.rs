//! An in-process bus with the Kafka semantics the outbox relies on, for unit tests and for
//! testing handlers; see [`MemoryBus`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use std::pin::Pin;

use tokio::sync::Notify;
use tokio::sync::futures::Notified;

use crate::bus::{Bus, Outgoing, Position, Publish, Receive, Received, Sent};
use crate::error::Error;

/// The partition of `key` among `partitions`: Kafka's default rule (the Java client's, and
/// librdkafka's `murmur2_random`): murmur2 of the key's bytes, made positive, modulo the
/// partition count.
pub fn partition_for(key: &[u8], partitions: i32) -> i32 {
    let positive = murmur2(key) & 0x7fff_ffff;
    (positive % partitions.max(1) as u32) as i32
}

/// Kafka's murmur2 (`org.apache.kafka.common.utils.Utils.murmur2`), seed `0x9747b28c`.
fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

#[derive(Debug, Clone)]
struct Record {
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    headers: Vec<(String, Option<Vec<u8>>)>,
}

#[derive(Debug, Default)]
struct Group {
    /// Members by id, each with its topics.
    members: BTreeMap<u64, Vec<String>>,
    /// Bumped on every join and leave: members look at their assignment again.
    generation: u64,
    /// The next offset to read, per (topic, partition).
    committed: HashMap<(String, i32), i64>,
    /// Members that left and joined again.
    rejoins: u64,
    /// Members of another system ([`MemoryBus::join_foreign`]): named, reading nothing here.
    foreign: std::collections::BTreeSet<String>,
}

#[derive(Debug, Default)]
struct State {
    topics: BTreeMap<String, Vec<Vec<Record>>>,
    groups: HashMap<String, Group>,
    next_member: u64,
    /// Topics whose publishes fail (a broker that lost them), with the error's text.
    failing: HashMap<String, String>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    changed: Notify,
    partitions: i32,
    max_message_bytes: usize,
    auto_create: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the state whole (every change is one step).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An in-process bus with the Kafka semantics the outbox relies on:
///
/// - a keyed record goes to [`partition_for`] its key (Kafka's murmur2 rule, so a key lands on
///   the partition it would on a broker with as many partitions), a record without a key to a
///   random partition;
/// - order per partition, offsets from 0;
/// - consumer groups: each member of a group gets a share of the partitions (partition `p` of a
///   topic to the `p mod n`-th of its `n` members, by join order); a member that joins or
///   leaves moves partitions, and the new owner reads from the group's committed offset;
/// - an offset stored by a member is the group's committed offset at once (librdkafka commits
///   stored offsets every 500 ms; here the interval is zero), so a member that stops, or
///   is dropped mid-batch, leaves every message after its last stored offset to be
///   redelivered;
/// - topics are made by [`Publish::ensure_topics`] (or [`MemoryBus::create_topic`]); a publish
///   to a topic that does not exist fails, as on a broker that does not create topics, and a
///   record larger than the limit ([`MemoryBus::with_max_message_bytes`], 1 MB) is refused
///   with [`Error::MessageTooLarge`].
///
/// Cloning gives another handle on the same bus.
#[derive(Debug, Clone)]
pub struct MemoryBus {
    shared: Arc<Shared>,
}

impl Default for MemoryBus {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBus {
    /// A bus whose topics get 3 partitions.
    pub fn new() -> Self {
        Self::build(3, 1_000_000, false)
    }

    fn build(partitions: i32, max_message_bytes: usize, auto_create: bool) -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                changed: Notify::new(),
                partitions: partitions.max(1),
                max_message_bytes,
                auto_create,
            }),
        }
    }

    /// A bus whose new topics get `partitions` partitions.
    pub fn with_partitions(self, partitions: i32) -> Self {
        Self::build(
            partitions,
            self.shared.max_message_bytes,
            self.shared.auto_create,
        )
    }

    /// A bus that refuses records larger than `bytes` (value, key and headers).
    pub fn with_max_message_bytes(self, bytes: usize) -> Self {
        Self::build(self.shared.partitions, bytes, self.shared.auto_create)
    }

    /// A bus that makes a topic on its first publish, as a broker with
    /// `auto.create.topics.enable`.
    pub fn auto_create_topics(self) -> Self {
        Self::build(self.shared.partitions, self.shared.max_message_bytes, true)
    }

    /// Makes `topic` with `partitions` partitions, when it does not exist.
    pub fn create_topic(&self, topic: &str, partitions: i32) {
        self.shared
            .lock()
            .topics
            .entry(topic.to_owned())
            .or_insert_with(|| vec![Vec::new(); partitions.max(1) as usize]);
    }

    /// Makes every publish to `topic` fail with `error` until [`MemoryBus::heal`].
    pub fn fail_publishes(&self, topic: &str, error: &str) {
        self.shared
            .lock()
            .failing
            .insert(topic.to_owned(), error.to_owned());
    }

    /// Lets publishes to `topic` succeed again.
    pub fn heal(&self, topic: &str) {
        self.shared.lock().failing.remove(topic);
    }

    /// The topics, sorted.
    pub fn topics(&self) -> Vec<String> {
        self.shared.lock().topics.keys().cloned().collect()
    }

    /// Every message of `topic`, partition by partition, each in offset order.
    pub fn messages(&self, topic: &str) -> Vec<Received> {
        let state = self.shared.lock();
        let Some(partitions) = state.topics.get(topic) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (p, records) in partitions.iter().enumerate() {
            for (offset, r) in records.iter().enumerate() {
                out.push(received(topic, p as i32, offset as i64, r));
            }
        }
        out
    }

    /// The next offset of each partition of `topic` (its length).
    pub fn end_offsets(&self, topic: &str) -> Vec<i64> {
        self.shared
            .lock()
            .topics
            .get(topic)
            .map(|ps| ps.iter().map(|p| p.len() as i64).collect())
            .unwrap_or_default()
    }

    /// Puts a member of another system (`client id@host`, say a Go consumer) in `group`, as
    /// [`Bus::foreign_members`] reports it; it reads nothing.
    pub fn join_foreign(&self, group: &str, member: &str) {
        let mut state = self.shared.lock();
        let g = state.groups.entry(group.to_owned()).or_default();
        g.foreign.insert(member.to_owned());
    }

    /// How many times members of `group` left it and joined again ([`Receive::rejoin`]).
    pub fn rejoins(&self, group: &str) -> u64 {
        self.shared
            .lock()
            .groups
            .get(group)
            .map_or(0, |g| g.rejoins)
    }

    /// The committed offset (the next to read) of `group` on each partition of `topic`.
    pub fn committed(&self, group: &str, topic: &str) -> Vec<i64> {
        let state = self.shared.lock();
        let n = state.topics.get(topic).map_or(0, Vec::len);
        (0..n as i32)
            .map(|p| {
                state
                    .groups
                    .get(group)
                    .and_then(|g| g.committed.get(&(topic.to_owned(), p)))
                    .copied()
                    .unwrap_or(0)
            })
            .collect()
    }

    /// Messages of `topic` that `group` has not committed past.
    pub fn lag(&self, group: &str, topic: &str) -> i64 {
        let ends = self.end_offsets(topic);
        let committed = self.committed(group, topic);
        ends.iter().zip(committed).map(|(e, c)| e - c).sum()
    }

    /// Resolves after the next publish, commit, join or leave from the moment of this call,
    /// even one that happens before it is first awaited: look at the state after calling it,
    /// then await it, and no change between the look and the wait is missed.
    pub fn changed(&self) -> Pin<Box<Notified<'_>>> {
        let mut notified = Box::pin(self.shared.changed.notified());
        notified.as_mut().enable();
        notified
    }

    fn publish(&self, state: &mut State, r: &Outgoing) -> Sent {
        if let Some(error) = state.failing.get(&r.topic) {
            return Sent::Failed(Error::Bus(format!("publish to `{}`: {error}", r.topic)));
        }
        let size = r.value.len()
            + r.key.as_ref().map_or(0, String::len)
            + r.headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        if size > self.shared.max_message_bytes {
            return Sent::Failed(Error::MessageTooLarge {
                topic: r.topic.clone(),
                size,
                max: self.shared.max_message_bytes,
            });
        }
        if self.shared.auto_create && !state.topics.contains_key(&r.topic) {
            state.topics.insert(
                r.topic.clone(),
                vec![Vec::new(); self.shared.partitions as usize],
            );
        }
        let Some(partitions) = state.topics.get_mut(&r.topic) else {
            return Sent::Failed(Error::UnknownTopic {
                topic: r.topic.clone(),
            });
        };
        let n = partitions.len() as i32;
        let partition = match &r.key {
            Some(k) => partition_for(k.as_bytes(), n),
            None => fastrand::i32(0..n),
        };
        let log = &mut partitions[partition as usize];
        log.push(Record {
            key: r.key.as_ref().map(|k| k.as_bytes().to_vec()),
            payload: r.value.clone(),
            headers: r
                .headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), Some(v.as_bytes().to_vec())))
                .collect(),
        });
        Sent::Acked {
            partition,
            offset: log.len() as i64 - 1,
        }
    }
}

fn received(topic: &str, partition: i32, offset: i64, r: &Record) -> Received {
    Received {
        topic: topic.to_owned(),
        partition,
        offset,
        key: r.key.clone(),
        payload: Some(r.payload.clone()),
        headers: r.headers.clone(),
    }
}

impl Publish for MemoryBus {
    async fn send_all(&self, records: &[Outgoing]) -> Vec<Sent> {
        let mut refused: HashSet<(&str, &str)> = HashSet::new();
        let out = {
            let mut state = self.shared.lock();
            records
                .iter()
                .map(|r| {
                    if let Some(k) = r.key.as_deref()
                        && refused.contains(&(r.topic.as_str(), k))
                    {
                        return Sent::HeldBack;
                    }
                    let sent = self.publish(&mut state, r);
                    if let (Sent::Failed(_), Some(k)) = (&sent, r.key.as_deref()) {
                        refused.insert((r.topic.as_str(), k));
                    }
                    sent
                })
                .collect()
        };
        self.shared.changed.notify_waiters();
        out
    }

    async fn ensure_topics(&self, topics: &[String]) -> Result<(), Error> {
        for t in topics {
            self.create_topic(t, self.shared.partitions);
        }
        Ok(())
    }
}

impl Bus for MemoryBus {
    type Receiver = MemoryReceiver;

    async fn foreign_members(&self, group: &str) -> Result<Vec<String>, Error> {
        let state = self.shared.lock();
        Ok(state
            .groups
            .get(group)
            .map(|g| g.foreign.iter().cloned().collect())
            .unwrap_or_default())
    }

    fn receiver(&self, group: &str, topics: &[String]) -> Result<MemoryReceiver, Error> {
        let id = {
            let mut state = self.shared.lock();
            state.next_member += 1;
            let id = state.next_member;
            let g = state.groups.entry(group.to_owned()).or_default();
            g.members.insert(id, topics.to_vec());
            g.generation += 1;
            id
        };
        self.shared.changed.notify_waiters();
        Ok(MemoryReceiver {
            bus: self.clone(),
            group: group.to_owned(),
            id,
            local: Mutex::new(Local::default()),
        })
    }
}

/// What a member knows: the generation it last saw, and its read position per partition.
#[derive(Debug, Default)]
struct Local {
    generation: u64,
    positions: BTreeMap<(String, i32), i64>,
    /// Where the round-robin over partitions goes on from.
    cursor: usize,
}

/// A member of a consumer group on a [`MemoryBus`]; it leaves the group when dropped.
#[derive(Debug)]
pub struct MemoryReceiver {
    bus: MemoryBus,
    group: String,
    id: u64,
    local: Mutex<Local>,
}

impl MemoryReceiver {
    /// This member's partitions under the group's current membership.
    fn assignment(state: &State, group: &str, id: u64) -> Vec<(String, i32)> {
        let Some(g) = state.groups.get(group) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let topics: std::collections::BTreeSet<&String> = g.members.values().flatten().collect();
        for topic in topics {
            let members: Vec<u64> = g
                .members
                .iter()
                .filter(|(_, ts)| ts.contains(topic))
                .map(|(id, _)| *id)
                .collect();
            let Some(me) = members.iter().position(|m| *m == id) else {
                continue;
            };
            let n = state.topics.get(topic).map_or(0, Vec::len);
            for p in 0..n {
                if p % members.len() == me {
                    out.push((topic.clone(), p as i32));
                }
            }
        }
        out
    }

    /// The next message, if one is there now.
    fn poll(&self) -> Option<Received> {
        let state = self.bus.shared.lock();
        let mut local = self.local.lock().unwrap_or_else(|p| p.into_inner());
        let g = state.groups.get(&self.group)?;
        let assigned = Self::assignment(&state, &self.group, self.id);
        if local.generation != g.generation || local.positions.len() != assigned.len() {
            local.generation = g.generation;
            let mut positions = BTreeMap::new();
            for tp in assigned {
                // A partition kept keeps its position; a new one starts at the committed offset.
                let pos = local
                    .positions
                    .get(&tp)
                    .copied()
                    .or_else(|| g.committed.get(&tp).copied())
                    .unwrap_or(0);
                positions.insert(tp, pos);
            }
            local.positions = positions;
        }
        let n = local.positions.len();
        let keys: Vec<(String, i32)> = local.positions.keys().cloned().collect();
        for i in 0..n {
            let tp = &keys[(local.cursor + i) % n];
            let pos = local.positions[tp];
            let Some(r) = state
                .topics
                .get(&tp.0)
                .and_then(|ps| ps.get(tp.1 as usize))
                .and_then(|log| log.get(pos as usize))
            else {
                continue;
            };
            let msg = received(&tp.0, tp.1, pos, r);
            local.positions.insert(tp.clone(), pos + 1);
            local.cursor = (local.cursor + i + 1) % n;
            return Some(msg);
        }
        None
    }
}

impl Receive for MemoryReceiver {
    async fn recv(&self) -> Result<Received, Error> {
        loop {
            let changed = self.bus.changed();
            if let Some(m) = self.poll() {
                return Ok(m);
            }
            changed.await;
        }
    }

    fn store_offset(&self, topic: &str, partition: i32, offset: i64) -> Result<(), Error> {
        {
            let mut state = self.bus.shared.lock();
            let tp = (topic.to_owned(), partition);
            if !Self::assignment(&state, &self.group, self.id).contains(&tp) {
                return Err(Error::NotAssigned {
                    topic: topic.to_owned(),
                    partition,
                });
            }
            if let Some(g) = state.groups.get_mut(&self.group) {
                let committed = g.committed.entry(tp).or_insert(0);
                *committed = (*committed).max(offset + 1);
            }
        }
        self.bus.shared.changed.notify_waiters();
        Ok(())
    }

    fn assigned(&self) -> usize {
        Self::assignment(&self.bus.shared.lock(), &self.group, self.id).len()
    }

    async fn commit(&self) -> Result<(), Error> {
        // Stored offsets are committed as they are stored.
        Ok(())
    }

    async fn positions(&self) -> Result<Vec<Position>, Error> {
        let state = self.bus.shared.lock();
        let topics = state
            .groups
            .get(&self.group)
            .and_then(|g| g.members.get(&self.id))
            .cloned()
            .unwrap_or_default();
        let mut out = Vec::new();
        for topic in topics {
            for (p, log) in state.topics.get(&topic).into_iter().flatten().enumerate() {
                let partition = p as i32;
                let committed = state
                    .groups
                    .get(&self.group)
                    .and_then(|g| g.committed.get(&(topic.clone(), partition)))
                    .copied()
                    .unwrap_or(0);
                out.push(Position {
                    topic: topic.clone(),
                    partition,
                    committed,
                    end: log.len() as i64,
                });
            }
        }
        Ok(out)
    }

    async fn rejoin(&self) -> Result<(), Error> {
        {
            let mut state = self.bus.shared.lock();
            if let Some(g) = state.groups.get_mut(&self.group) {
                g.rejoins += 1;
                g.generation += 1;
            }
            // As a new member: every partition starts again at its committed offset.
            self.local
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .positions
                .clear();
        }
        self.bus.shared.changed.notify_waiters();
        Ok(())
    }
}

impl Drop for MemoryReceiver {
    fn drop(&mut self) {
        {
            let mut state = self.bus.shared.lock();
            if let Some(g) = state.groups.get_mut(&self.group) {
                g.members.remove(&self.id);
                g.generation += 1;
            }
        }
        self.bus.shared.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(topic: &str, key: &str, value: &str) -> Outgoing {
        Outgoing {
            topic: topic.to_owned(),
            key: Some(key.to_owned()),
            value: value.as_bytes().to_vec(),
            headers: vec![("traceparent", "00-x".to_owned())],
        }
    }

    #[test]
    fn murmur2_matches_kafkas_reference_values() {
        // org.apache.kafka.common.utils.UtilsTest#testMurmur2
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (key, expected) in cases {
            assert_eq!(
                murmur2(key) as i32,
                expected,
                "{}",
                String::from_utf8_lossy(key)
            );
        }
    }

    #[tokio::test]
    async fn a_key_keeps_its_partition_and_order() {
        let bus = MemoryBus::new().with_partitions(4);
        bus.ensure_topics(&["t".to_owned()]).await.unwrap();
        let records: Vec<Outgoing> = (0..20)
            .map(|i| out("t", &format!("k{}", i % 5), &i.to_string()))
            .collect();
        let sent = bus.send_all(&records).await;
        for (r, s) in records.iter().zip(&sent) {
            let Sent::Acked { partition, .. } = s else {
                panic!("{s:?}")
            };
            assert_eq!(
                *partition,
                partition_for(r.key.as_deref().unwrap().as_bytes(), 4)
            );
        }
        for k in 0..5 {
            let key = format!("k{k}");
            let values: Vec<String> = bus
                .messages("t")
                .into_iter()
                .filter(|m| m.key_str().as_deref() == Some(key.as_str()))
                .map(|m| String::from_utf8(m.payload.unwrap()).unwrap())
                .collect();
            let expected: Vec<String> = (0..20)
                .filter(|i| i % 5 == k)
                .map(|i| i.to_string())
                .collect();
            assert_eq!(values, expected);
        }
    }

    #[tokio::test]
    async fn a_refused_record_holds_back_its_keys_later_records() {
        let bus = MemoryBus::new().with_max_message_bytes(64);
        bus.create_topic("t", 1);
        let big = "x".repeat(100);
        let sent = bus
            .send_all(&[
                out("t", "a", &big),
                out("t", "a", "after"),
                out("t", "b", "other key"),
                out("missing", "c", "no topic"),
            ])
            .await;
        assert!(
            matches!(sent[0], Sent::Failed(Error::MessageTooLarge { .. })),
            "{sent:?}"
        );
        assert!(matches!(sent[1], Sent::HeldBack), "{sent:?}");
        assert!(matches!(sent[2], Sent::Acked { offset: 0, .. }), "{sent:?}");
        assert!(
            matches!(&sent[3], Sent::Failed(Error::UnknownTopic { topic }) if topic == "missing")
        );
        bus.fail_publishes("t", "broker down");
        assert!(matches!(
            bus.send(&out("t", "b", "x")).await,
            Err(Error::Bus(_))
        ));
        bus.heal("t");
        assert_eq!(bus.send(&out("t", "b", "x")).await.unwrap(), (0, 1));
    }

    #[tokio::test]
    async fn a_group_shares_partitions_and_a_restarted_member_resumes_at_the_committed_offset() {
        let bus = MemoryBus::new().with_partitions(4);
        bus.create_topic("t", 4);
        let records: Vec<Outgoing> = (0..40).map(|i| out("t", &format!("k{i}"), "v")).collect();
        bus.send_all(&records).await;
        let topics = ["t".to_owned()];
        let a = bus.receiver("g", &topics).unwrap();
        let b = bus.receiver("g", &topics).unwrap();
        assert_eq!((a.assigned(), b.assigned()), (2, 2));
        let other = bus.receiver("other", &topics).unwrap();
        assert_eq!(other.assigned(), 4, "another group reads every partition");

        // `a` reads a message and stores it; reads a second and does not.
        let first = a.recv().await.unwrap();
        a.store_offset(&first.topic, first.partition, first.offset)
            .unwrap();
        let second = a.recv().await.unwrap();
        // A partition that is not this member's cannot be stored.
        let foreign = MemoryReceiver::assignment(&bus.shared.lock(), "g", b.id)[0].1;
        assert!(matches!(
            a.store_offset("t", foreign, 0),
            Err(Error::NotAssigned { .. })
        ));
        drop(a);
        // `b` now owns every partition and gets the unstored message again.
        assert_eq!(b.assigned(), 4);
        let mut seen = Vec::new();
        while let Some(m) = b.poll() {
            seen.push((m.partition, m.offset));
        }
        assert!(
            seen.contains(&(second.partition, second.offset)),
            "redelivered"
        );
        assert!(
            !seen.contains(&(first.partition, first.offset)),
            "stored, not redelivered"
        );
        assert_eq!(seen.len(), 39);
        drop(b);
        let c = bus.receiver("g", &topics).unwrap();
        let mut again = 0;
        while c.poll().is_some() {
            again += 1;
        }
        assert_eq!(again, 39, "nothing past `first` was stored");
        assert_eq!(bus.lag("g", "t"), 39);
    }

    #[tokio::test]
    async fn recv_waits_for_a_publish() {
        let bus = MemoryBus::new();
        bus.create_topic("t", 3);
        let r = bus.receiver("g", &["t".to_owned()]).unwrap();
        let waiting = tokio::spawn(async move { r.recv().await.map(|m| m.payload) });
        tokio::task::yield_now().await;
        bus.send(&out("t", "k", "late")).await.unwrap();
        assert_eq!(waiting.await.unwrap().unwrap(), Some(b"late".to_vec()));
    }
}
