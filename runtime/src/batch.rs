//! Continuous batching: the decode steps of sequences generated at once run as one batch.
//!
//! Each sequence still runs its own token loop on its own thread ([`crate::generate::run`]);
//! its model steps go to one worker thread that owns the KV arena. The worker gathers the steps
//! of every sequence it served last round (waiting a short while for stragglers), runs new
//! prompts one by one (a first token waits for no batch: measured, this halved the first-token
//! time at 8 clients and cost no throughput), then the decode steps as one batch, and answers
//! each sequence with its logits. One batched step of B sequences costs far less than B single
//! steps on a CPU (the weights are read once per step, not once per sequence), which is where
//! the gain is.
//!
//! Sequences hold slots `0..n` of the arena without gaps: when one leaves, it trades places
//! with the sequence in the highest slot, so a batch is always one contiguous view, and what it
//! leaves stays in a free slot for a later prompt that starts the same way (a shared system
//! prompt, a repeated question), which then runs only the rest. A sequence that
//! is slow to send its step (its client reads slowly) keeps its slot; if it lies inside the
//! batch it rides along as a placeholder row that rewrites the position it will write next
//! anyway, and it is served in a later round.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::decoder::{BatchRow, Decoder};
use crate::error::{Error, Result};
use crate::generate::Forward;
use crate::kv_arena::KvArena;

/// Longest and shortest wait for sequences served last round to send their next step.
const GATHER_MAX: Duration = Duration::from_millis(20);
const GATHER_MIN: Duration = Duration::from_micros(500);

/// A step a sequence asks for; the worker answers on `reply` with its logits (in the buffer
/// the sequence lent it).
struct Step {
    seq: u64,
    ids: Vec<u32>,
    logits: Vec<f32>,
    reply: SyncSender<Result<Vec<f32>>>,
}

enum Msg {
    Step(Step),
    /// The sequence is done: its slot frees.
    Leave(u64),
}

/// What the batcher has run so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Batched decode steps run.
    pub steps: u64,
    /// Sequences' decode steps in them (`rows / steps` is the mean batch).
    pub rows: u64,
    /// Placeholder rows: sequences inside a batch that had not sent their step in time.
    pub placeholders: u64,
    /// Prompt tokens not run because a free slot already held them (a shared start).
    pub reused: u64,
}

#[derive(Default)]
struct Counters {
    steps: AtomicU64,
    rows: AtomicU64,
    placeholders: AtomicU64,
    reused: AtomicU64,
}

/// The handle engines keep: where sequences send their steps.
pub(crate) struct Batcher {
    tx: Option<Sender<Msg>>,
    worker: Option<JoinHandle<()>>,
    next_seq: AtomicU64,
    sequences: usize,
    counters: Arc<Counters>,
    /// False once the worker has stopped (it panicked, or the batcher is closing).
    running: Arc<AtomicBool>,
}

/// Clears `running` when the worker thread ends, however it ends.
struct Running(Arc<AtomicBool>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

impl Batcher {
    /// Starts the worker over `arena`, running steps on `decoder`.
    pub(crate) fn start(decoder: Arc<Mutex<Decoder>>, arena: KvArena, reuse_prompts: bool) -> Result<Self> {
        let sequences = arena.slots();
        let (tx, rx) = mpsc::channel();
        let counters = Arc::new(Counters::default());
        let running = Arc::new(AtomicBool::new(true));
        let mut worker = Worker::new(decoder, arena, Arc::clone(&counters), reuse_prompts);
        let guard = Running(Arc::clone(&running));
        let worker = std::thread::Builder::new()
            .name("edgelm-batch".into())
            .spawn(move || {
                let _guard = guard;
                worker.run(rx)
            })
            .map_err(|e| Error::InvalidRequest(format!("cannot start the batching thread: {e}")))?;
        Ok(Batcher { tx: Some(tx), worker: Some(worker), next_seq: 0.into(), sequences, counters, running })
    }

    /// Whether the worker is there to run steps. If it ever stops (a panic in a step), the
    /// engine goes back to sequences taking turns, and steps in flight fail.
    pub(crate) fn running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }

    /// Counts so far.
    pub(crate) fn stats(&self) -> BatchStats {
        let c = &self.counters;
        BatchStats {
            steps: c.steps.load(Ordering::Relaxed),
            rows: c.rows.load(Ordering::Relaxed),
            placeholders: c.placeholders.load(Ordering::Relaxed),
            reused: c.reused.load(Ordering::Relaxed),
        }
    }

    /// Sequences whose steps may share a batch (the arena's slots).
    pub(crate) fn sequences(&self) -> usize {
        self.sequences
    }

    /// A new sequence; its first step takes a slot (waiting for one if all are held).
    pub(crate) fn sequence(&self, vocab: usize) -> BatchedSequence<'_> {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        BatchedSequence { batcher: self, seq, logits: vec![0.0; vocab] }
    }

    fn send(&self, msg: Msg) -> bool {
        self.tx.as_ref().is_some_and(|tx| tx.send(msg).is_ok())
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        // Closing the channel ends the worker once it has answered what it holds.
        drop(self.tx.take());
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// One sequence's side of the batcher: what its token loop drives.
pub(crate) struct BatchedSequence<'a> {
    batcher: &'a Batcher,
    seq: u64,
    logits: Vec<f32>,
}

impl Forward for BatchedSequence<'_> {
    fn forward(&mut self, ids: &[u32]) -> Result<&mut [f32]> {
        let stopped = || Error::InvalidRequest("the batching thread stopped".into());
        let (reply, answer) = mpsc::sync_channel(1);
        let step = Step { seq: self.seq, ids: ids.to_vec(), logits: std::mem::take(&mut self.logits), reply };
        if !self.batcher.send(Msg::Step(step)) {
            return Err(stopped());
        }
        self.logits = answer.recv().map_err(|_| stopped())??;
        Ok(&mut self.logits)
    }
}

impl Drop for BatchedSequence<'_> {
    fn drop(&mut self) {
        self.batcher.send(Msg::Leave(self.seq));
    }
}

struct Worker {
    decoder: Arc<Mutex<Decoder>>,
    arena: KvArena,
    /// Sequences holding slots `0..occupants.len()`.
    occupants: Vec<u64>,
    /// For every slot, the tokens whose keys and values it holds (positions `0..len`). A free
    /// slot keeps what its last sequence left: a prompt that starts the same way reuses it.
    contents: Vec<Vec<u32>>,
    /// For every slot, when its last sequence left (a count of sequences; 0: never used).
    last_used: Vec<u64>,
    left: u64,
    /// Steps of sequences without a slot yet, in arrival order.
    prompts: VecDeque<Step>,
    /// Single-token steps of sequences with a slot, for the next batch.
    decodes: Vec<Step>,
    /// Multi-token steps of sequences with a slot (a prompt continued), run alone.
    extends: Vec<Step>,
    /// Sequences answered last round that have not sent their next step or left.
    expected: HashSet<u64>,
    last_batch: Duration,
    vocab: usize,
    logits: Vec<f32>,
    counters: Arc<Counters>,
    reuse_prompts: bool,
}

impl Worker {
    fn new(decoder: Arc<Mutex<Decoder>>, arena: KvArena, counters: Arc<Counters>, reuse_prompts: bool) -> Self {
        let vocab = decoder.lock().unwrap_or_else(|e| e.into_inner()).vocab_size();
        Worker {
            vocab,
            decoder,
            contents: vec![Vec::new(); arena.slots()],
            last_used: vec![0; arena.slots()],
            left: 0,
            arena,
            occupants: vec![],
            prompts: VecDeque::new(),
            decodes: vec![],
            extends: vec![],
            expected: HashSet::new(),
            last_batch: Duration::ZERO,
            logits: vec![],
            counters,
            reuse_prompts,
        }
    }

    fn run(&mut self, rx: Receiver<Msg>) {
        loop {
            let idle = self.decodes.is_empty() && self.extends.is_empty() && !self.can_admit();
            if idle {
                match rx.recv() {
                    Ok(m) => self.take(m),
                    Err(_) => return,
                }
            }
            self.gather(&rx);
            self.run_prompts();
            self.run_decodes();
            self.run_extends();
        }
    }

    fn can_admit(&self) -> bool {
        !self.prompts.is_empty() && self.occupants.len() < self.arena.slots()
    }

    fn slot_of(&self, seq: u64) -> Option<usize> {
        self.occupants.iter().position(|&s| s == seq)
    }

    /// Waits until every sequence served last round has sent its step or left, or a short
    /// while (half the last batch's time) has passed; then takes whatever else has arrived.
    /// A sequence that missed the wait is not waited for again until it has been served: one
    /// slow client (a stream nobody reads) must not slow every round.
    fn gather(&mut self, rx: &Receiver<Msg>) {
        let deadline = Instant::now() + (self.last_batch / 2).clamp(GATHER_MIN, GATHER_MAX);
        while !self.expected.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(m) => self.take(m),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        self.expected.clear();
        while let Ok(m) = rx.try_recv() {
            self.take(m);
        }
    }

    fn take(&mut self, msg: Msg) {
        match msg {
            Msg::Step(step) => {
                self.expected.remove(&step.seq);
                match self.slot_of(step.seq) {
                    None => self.prompts.push_back(step),
                    Some(_) if step.ids.len() == 1 => self.decodes.push(step),
                    Some(_) => self.extends.push(step),
                }
            }
            Msg::Leave(seq) => {
                self.expected.remove(&seq);
                match self.slot_of(seq) {
                    Some(i) => {
                        // The last occupant takes its place; what it leaves stays in the
                        // (now free) last slot for a prompt that starts the same way.
                        let last = self.occupants.len() - 1;
                        self.swap(i, last);
                        self.occupants.swap_remove(i);
                        self.left += 1;
                        self.last_used[last] = self.left;
                    }
                    None => self.prompts.retain(|p| p.seq != seq),
                }
            }
        }
    }

    /// Exchanges the caches of slots `a` and `b`.
    fn swap(&mut self, a: usize, b: usize) {
        if a != b {
            let positions = self.contents[a].len().max(self.contents[b].len());
            self.arena.swap_slots(a, b, positions);
            self.contents.swap(a, b);
            self.last_used.swap(a, b);
        }
    }

    /// One batch over slots `0..n`, `n` the highest slot with a step: the others inside it are
    /// placeholder rows.
    fn run_decodes(&mut self) {
        if self.decodes.is_empty() {
            return;
        }
        let mut steps: Vec<Option<Step>> = self.occupants.iter().map(|_| None).collect();
        for step in std::mem::take(&mut self.decodes) {
            let i = self.slot_of(step.seq).expect("decode steps have a slot");
            steps[i] = Some(step);
        }
        let n = steps.iter().rposition(Option::is_some).map_or(0, |i| i + 1);
        let capacity = self.arena.capacity();
        let placeholder = [0u32];
        let rows: Vec<BatchRow<'_>> = steps[..n]
            .iter()
            .zip(&self.contents)
            .map(|(step, held)| match step {
                Some(s) => BatchRow { past: held.len(), ids: &s.ids },
                // Writes where its sequence writes next (or, for a full cache that takes no
                // more steps, its last position), so nothing it will read changes.
                None => BatchRow { past: held.len().min(capacity - 1), ids: &placeholder },
            })
            .collect();
        let vocab = self.vocab;
        self.logits.resize(n * vocab, 0.0);
        let started = Instant::now();
        let result = {
            let mut decoder = self.decoder.lock().unwrap_or_else(|e| e.into_inner());
            decoder.forward_batch(&mut self.arena, 0, &rows, &mut self.logits)
        };
        self.last_batch = started.elapsed();
        let real = steps.iter().filter(|s| s.is_some()).count() as u64;
        self.counters.steps.fetch_add(1, Ordering::Relaxed);
        self.counters.rows.fetch_add(real, Ordering::Relaxed);
        self.counters.placeholders.fetch_add(n as u64 - real, Ordering::Relaxed);
        let failure = result.err().map(|e| e.to_string());
        for (i, step) in steps.into_iter().enumerate().take(n) {
            let Some(step) = step else { continue };
            let answer = match &failure {
                None => {
                    self.contents[i].push(step.ids[0]);
                    Ok(fill(step.logits, &self.logits[i * vocab..(i + 1) * vocab]))
                }
                Some(msg) => Err(Error::Ort(ort::Error::new(msg.clone()))),
            };
            self.answer(step.seq, &step.reply, answer);
        }
    }

    fn run_extends(&mut self) {
        for step in std::mem::take(&mut self.extends) {
            let Some(i) = self.slot_of(step.seq) else { continue };
            let past = self.contents[i].len();
            let answer = self.run_alone(i, past, &step.ids).map(|logits| fill(step.logits, logits));
            if answer.is_ok() {
                self.contents[i].extend_from_slice(&step.ids);
            }
            self.answer(step.seq, &step.reply, answer);
        }
    }

    /// New sequences take free slots and run their prompts, one at a time. Each takes a free
    /// slot holding at least half its prompt, or else the one left longest ago, and runs only
    /// what that slot does not already hold.
    fn run_prompts(&mut self) {
        while self.can_admit() {
            let step = self.prompts.pop_front().expect("can_admit saw one");
            let n = self.occupants.len();
            let free = n..self.arena.slots();
            // What slot j already holds of the prompt (nothing counts without prompt reuse).
            let held = |j: usize| if self.reuse_prompts { common_prefix(&self.contents[j], &step.ids) } else { 0 };
            let (similar, shared) = free
                .clone()
                .map(|j| (j, held(j)))
                .max_by_key(|&(j, len)| (len, std::cmp::Reverse(j)))
                .expect("a free slot");
            // A slot sharing at least half the prompt is worth taking over; otherwise the one
            // left longest ago (empty ones first), so that a short shared start (the chat
            // template's first tokens) does not wipe out a cache a later prompt could use.
            let (best, shared) = if 2 * shared >= step.ids.len() {
                (similar, shared)
            } else {
                let lru = free.min_by_key(|&j| (self.last_used[j], j)).expect("a free slot");
                (lru, held(lru))
            };
            self.swap(n, best);
            self.occupants.push(step.seq);
            // At least the prompt's last token runs: its logits are the answer.
            let mut reuse = shared.min(step.ids.len() - 1);
            self.contents[n].truncate(reuse);
            let mut ran = self.run_alone(n, reuse, &step.ids[reuse..]).map(drop);
            if ran.is_err() && reuse > 0 {
                // A runtime whose attention cannot continue a cached prompt runs it whole.
                reuse = 0;
                ran = self.run_alone(n, 0, &step.ids).map(drop);
            }
            self.contents[n].clear();
            let answer = match ran {
                Ok(()) => {
                    self.contents[n].extend_from_slice(&step.ids);
                    self.counters.reused.fetch_add(reuse as u64, Ordering::Relaxed);
                    Ok(fill(step.logits, &self.logits[..self.vocab]))
                }
                // What it wrote is unknown: the slot frees, holding nothing.
                Err(e) => {
                    self.occupants.pop();
                    Err(e)
                }
            };
            self.answer(step.seq, &step.reply, answer);
        }
    }

    fn run_alone(&mut self, slot: usize, past: usize, ids: &[u32]) -> Result<&[f32]> {
        let vocab = self.vocab;
        self.logits.resize(vocab, 0.0);
        let row = [BatchRow { past, ids }];
        let mut decoder = self.decoder.lock().unwrap_or_else(|e| e.into_inner());
        decoder.forward_batch(&mut self.arena, slot, &row, &mut self.logits[..vocab])?;
        Ok(&self.logits[..vocab])
    }

    /// Sends a step's answer; a sequence that answered is expected back next round.
    fn answer(&mut self, seq: u64, reply: &SyncSender<Result<Vec<f32>>>, answer: Result<Vec<f32>>) {
        let ok = answer.is_ok();
        if reply.send(answer).is_ok() && ok {
            self.expected.insert(seq);
        }
    }
}

/// Length of the common start of `a` and `b`.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// `buffer` (a sequence's own) holding `logits`.
fn fill(mut buffer: Vec<f32>, logits: &[f32]) -> Vec<f32> {
    buffer.clear();
    buffer.extend_from_slice(logits);
    buffer
}
