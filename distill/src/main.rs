//! `edgelm-distill`: host-side commands (data, training, distillation, evaluation, export, and
//! the `pipeline` main command). Each command group lives in a file of `cli/`.
//!
//! Exit codes: 0 success, 1 any failure (the message says what to do), 2 bad arguments.

mod cli;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Result;
use clap::{Parser, Subcommand};
use mimalloc::MiMalloc;

use cli::{checkpoint, data, eval, export, sign, train};

#[global_allocator]
static ALLOCATOR: Allocator = Allocator;

/// The process's allocator: mimalloc, keeping freed pages, once a training command has asked
/// for it ([`Allocator::train`]); the system's before that and for every other command.
///
/// Each training step frees and allocates many activation-sized buffers on two worker
/// threads. glibc's malloc returns them to the kernel and faults them in again, so a LoRA step
/// spent a quarter of its time in page faults and TLB flushes; mimalloc told never to return
/// freed pages reuses them, and a LoRA fine-tune trains 25 to 30% faster (BENCHMARKS.md). The
/// commands that do not train keep glibc: an export frees each weight's buffers before reading
/// the next, different-sized ones, and under mimalloc its peak doubled with freed pages kept (a
/// third higher with mimalloc's default delay; returning them at once cost 7 to 29% of its
/// time). `pipeline` trains, so its exports run under mimalloc too (its models are small).
struct Allocator;

/// Set once, before any thread starts, by [`Allocator::train`].
static TRAINING: AtomicBool = AtomicBool::new(false);

/// mimalloc's `purge_delay` option: its index in `mi_option_e` (mimalloc.h, the same in v2 and
/// v3), which libmimalloc-sys does not name.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Alignments above this go to the system allocator: mimalloc serves them straight from the OS
/// with the page header before the block, and its page map then covers a slice past the
/// mapping, where a later system block would be taken for its own.
const MIMALLOC_MAX_ALIGN: usize = 64 * 1024;

impl Allocator {
    /// Switches new allocations to mimalloc with freed pages kept. Call before any thread
    /// starts; what the system allocator handed out before is still freed by it.
    fn train() {
        // SAFETY: a plain option write while the process has one thread (mimalloc's options
        // are not synchronised).
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
        TRAINING.store(true, Ordering::SeqCst);
    }

    /// Whether a new block of `layout` comes from mimalloc.
    fn mimalloc_for(layout: Layout) -> bool {
        TRAINING.load(Ordering::Relaxed) && layout.align() <= MIMALLOC_MAX_ALIGN
    }

    /// Whether mimalloc handed out `ptr`, a block of `layout` (never before
    /// [`Allocator::train`], nor for alignments it is not given).
    fn from_mimalloc(ptr: *mut u8, layout: Layout) -> bool {
        // SAFETY: a lookup in mimalloc's own page map; any address may be asked.
        Self::mimalloc_for(layout) && unsafe { libmimalloc_sys::mi_is_in_heap_region(ptr.cast()) }
    }
}

// SAFETY: every block is freed or resized by the allocator that made it (`from_mimalloc`), and
// both allocators uphold `GlobalAlloc`'s contract themselves; the callers' obligations pass
// through unchanged.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if Self::mimalloc_for(layout) {
            unsafe { MiMalloc.alloc(layout) }
        } else {
            unsafe { System.alloc(layout) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if Self::mimalloc_for(layout) {
            unsafe { MiMalloc.alloc_zeroed(layout) }
        } else {
            unsafe { System.alloc_zeroed(layout) }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if Self::from_mimalloc(ptr, layout) {
            unsafe { MiMalloc.dealloc(ptr, layout) }
        } else {
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if Self::from_mimalloc(ptr, layout) {
            unsafe { MiMalloc.realloc(ptr, layout, new_size) }
        } else {
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }
}

#[derive(Parser)]
#[command(
    name = "edgelm-distill",
    version,
    about = "Train, distil, score and export models for edgelm, from Hugging Face checkpoints"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a random checkpoint of a named shape in the Hugging Face layout.
    Init(checkpoint::InitArgs),
    /// List the presets `init` knows.
    Presets,
    /// Train the recipe's teacher from scratch (tokenizer, weights) into a checkpoint.
    Pretrain(train::PretrainArgs),
    /// Train LoRA adapters on instruction data with the base frozen (PEFT layout output).
    Finetune(train::FinetuneArgs),
    /// Fold a LoRA adapter into its base checkpoint (for export).
    Merge(checkpoint::MergeArgs),
    /// Distil a teacher into a student made of a subset of its layers (optionally narrower).
    Distill(train::DistillArgs),
    /// Score checkpoints (candle) and bundles (ONNX Runtime) on the test split.
    Eval(eval::EvalArgs),
    /// The main command: distil the recipe's teacher, export, answer held-out commands on the
    /// runtime, and write report.json + report.svg.
    Pipeline(eval::PipelineArgs),
    /// Training data: the built-in task, or your own data prepared for training.
    #[command(subcommand)]
    Data(DataCommand),
    /// Export a checkpoint to an edgelm bundle (ONNX with KV cache, fp32 or INT8/INT4) and check it.
    Export(export::ExportArgs),
    /// Check a causal LM bundle (edgelm's, an onnxruntime-genai folder or an Optimum export)
    /// against the checkpoint it was made from, on the export's check.
    Check(export::CheckArgs),
    /// Zero the smallest weights of a checkpoint's projections (magnitude pruning, global or per
    /// layer; embeddings and norms left alone by default).
    Prune(checkpoint::PruneArgs),
    /// Remove whole MLP units and KV groups, ranked on calibration data, and optionally recover
    /// by distilling from the unpruned model (the matrices shrink, so dense kernels run faster).
    PruneStructured(train::PruneStructuredArgs),
    /// Distil a sentence encoder into one with fewer layers on unlabelled text.
    DistillEncoder(train::DistillEncoderArgs),
    /// Quantize an fp32 bundle (edgelm's, an onnxruntime-genai folder or an Optimum export) to INT8/INT4 weights and check it against the source.
    Quantize(export::QuantizeArgs),
    /// Make an ed25519 signing key pair: KEY (private, PEM, owner-only) and KEY.pub (for boards).
    Keygen(sign::KeygenArgs),
    /// Sign a bundle (writes edgelm.sig over its manifest, after checking every file).
    Sign(sign::SignArgs),
}

#[derive(Subcommand)]
enum DataCommand {
    /// Generate the built-in device-command task (train/validation/test JSONL).
    Generate(data::GenerateArgs),
    /// Train a byte-level BPE tokenizer (ChatML special tokens and template) on a data set.
    Tokenizer(data::TokenizerArgs),
    /// Normalise, deduplicate, split and optionally augment JSONL triples or plain text.
    Prepare(data::PrepareArgs),
}

fn main() {
    // Rust ignores SIGPIPE, so printing to a closed pipe (`edgelm-distill eval ... | head`)
    // would panic; the default action ends the process quietly, as Unix tools do.
    // SAFETY: setting a signal's disposition touches no Rust state.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("EDGELM_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if cli.command.trains() {
        // Before any thread starts: both change process-wide settings.
        Allocator::train();
        edgelm_distill::train::workers::use_data_parallel_training();
    }
    if let Err(e) = run(cli) {
        // A run stopped where it was asked to stop is not a failure: say how to go on.
        if let Some(halted @ edgelm_distill::Error::Halted { .. }) = e.downcast_ref::<edgelm_distill::Error>() {
            eprintln!("{halted}");
            return;
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

impl Command {
    /// Commands that run the shared training loop (data-parallel over the cores).
    fn trains(&self) -> bool {
        matches!(
            self,
            Command::Pretrain(_)
                | Command::Finetune(_)
                | Command::Distill(_)
                | Command::Pipeline(_)
                | Command::PruneStructured(_)
                | Command::DistillEncoder(_)
        )
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Init(a) => checkpoint::init(a),
        Command::Presets => checkpoint::presets(),
        Command::Pretrain(a) => train::pretrain(a),
        Command::Finetune(a) => train::finetune(a),
        Command::Merge(a) => checkpoint::merge(a),
        Command::Quantize(a) => export::quantize(a),
        Command::Check(a) => export::check(a),
        Command::Keygen(a) => sign::keygen(a),
        Command::Sign(a) => sign::sign(a),
        Command::Prune(a) => checkpoint::prune(a),
        Command::PruneStructured(a) => train::prune_structured(a),
        Command::DistillEncoder(a) => train::distill_encoder(a),
        Command::Distill(a) => train::distill(a),
        Command::Eval(a) => eval::eval(a),
        Command::Pipeline(a) => eval::pipeline(a),
        Command::Data(DataCommand::Generate(a)) => data::generate(a),
        Command::Data(DataCommand::Tokenizer(a)) => data::tokenizer(a),
        Command::Data(DataCommand::Prepare(a)) => data::prepare(a),
        Command::Export(a) => export::export(a),
    }
}
