//! The C ABI of the edgelm runtime: `libedgelm.so` / `libedgelm.a` with the header
//! `include/edgelm.h` (generated from this file by cbindgen; a test keeps them in step). The
//! conventions every function keeps are written at the top of the header (`cbindgen.toml`),
//! where a C programmer reads first.
//!
//! Values that C writes and Rust reads are plain integers checked at the boundary: a Rust enum
//! read from C memory that holds an unlisted value would be undefined behaviour.
#![allow(non_camel_case_types)]
#![allow(clippy::missing_safety_doc)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::ops::ControlFlow;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use edgelm_runtime::decoder::KvCacheMode;
use edgelm_runtime::signature::TrustedKeys;
use edgelm_runtime::{EngineOptions, Error, GenerateParams, Generation, Model, SamplingParams, StopReason};

/// Major version of the library this header belongs to (also in edgelm_version()).
pub const EDGELM_VERSION_MAJOR: u32 = 0;
/// Minor version: grows with every release that changes the ABI while the major is 0.
pub const EDGELM_VERSION_MINOR: u32 = 2;
/// Patch version.
pub const EDGELM_VERSION_PATCH: u32 = 0;

/// Result of every call.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum edgelm_status {
    /// Success.
    EDGELM_OK = 0,
    /// A required pointer is NULL or a value is out of range.
    EDGELM_ERR_INVALID_ARGUMENT = 1,
    /// The model handle is NULL, freed, or was never returned by edgelm_model_load.
    EDGELM_ERR_INVALID_HANDLE = 2,
    /// A string argument is not valid UTF-8.
    EDGELM_ERR_INVALID_UTF8 = 3,
    /// A file could not be read.
    EDGELM_ERR_IO = 4,
    /// The bundle is malformed, incomplete or corrupt (hash mismatch).
    EDGELM_ERR_BUNDLE = 5,
    /// ONNX Runtime could not be loaded, refused the bundle's graph (an operator or attribute the
    /// loaded release lacks; the message says which and how to make a bundle it runs), or failed
    /// while running the model.
    EDGELM_ERR_RUNTIME = 6,
    /// The tokenizer failed, or the bundle has none and text was given.
    EDGELM_ERR_TOKENIZER = 7,
    /// The prompt does not fit the model's context, or a token id is outside the vocabulary.
    EDGELM_ERR_CONTEXT_OVERFLOW = 8,
    /// Another thread is generating with this model; one generation runs at a time per model.
    EDGELM_ERR_BUSY = 9,
    /// The operation does not apply to this bundle (e.g. embeddings from a causal LM).
    EDGELM_ERR_UNSUPPORTED = 10,
    /// A bug inside edgelm (a caught panic); the message says where.
    EDGELM_ERR_INTERNAL = 11,
    /// The bundle's signature is missing where one is required, made by a key that is not
    /// trusted, or does not match the bundle (altered after signing); or a trusted key file is
    /// not an ed25519 public key.
    EDGELM_ERR_SIGNATURE = 12,
}

use edgelm_status::*;

/// Why a generation ended (in `edgelm_stats`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum edgelm_stop_reason {
    /// An end-of-sequence token was generated.
    EDGELM_STOP_EOS = 0,
    /// A stop string appeared.
    EDGELM_STOP_STRING = 1,
    /// max_new_tokens were generated.
    EDGELM_STOP_MAX_TOKENS = 2,
    /// The model's context is full.
    EDGELM_STOP_CONTEXT_FULL = 3,
    /// The callback returned false or edgelm_cancel was called.
    EDGELM_STOP_CANCELLED = 4,
}

/// KV cache strategy: the values of `edgelm_load_options.kv_cache`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum edgelm_kv_cache {
    /// Preallocated and updated in place (fast; the default).
    EDGELM_KV_SHARED = 0,
    /// Present outputs fed back as past inputs (works with any graph; copies every step).
    EDGELM_KV_GROWING = 1,
}

/// What a bundle holds (from edgelm_model_kind).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum edgelm_kind {
    /// A causal language model: edgelm_generate and edgelm_generate_ids.
    EDGELM_KIND_CAUSAL_LM = 0,
    /// A sentence encoder: edgelm_embed.
    EDGELM_KIND_ENCODER = 1,
}

/// Opaque model handle. Create with edgelm_model_load, destroy with edgelm_model_free. The
/// struct is never defined: C code holds pointers to it only.
pub struct edgelm_model {
    _private: [u8; 0],
}

/// Options for edgelm_model_load. Get defaults from edgelm_load_options_default.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct edgelm_load_options {
    /// Intra-op threads; 0 = one per physical core.
    pub threads: u32,
    /// KV cache strategy: an edgelm_kv_cache value (EDGELM_KV_SHARED by default). Any other
    /// value makes edgelm_model_load return EDGELM_ERR_INVALID_ARGUMENT.
    pub kv_cache: u32,
    /// Path of libonnxruntime.so to load, or NULL to search: EDGELM_ORT_LIB, ORT_DYLIB_PATH,
    /// next to the executable (in its lib/, in ../lib/, then beside it), then the system
    /// library path. The first successful load in a process holds for its lifetime (later paths
    /// are ignored); a failed load is not remembered, so a later call may try another path or
    /// environment.
    pub ort_library: *const c_char,
    /// Array of n_trusted_keys NUL-terminated UTF-8 paths, or NULL: PEM ed25519 public key
    /// files (`edgelm-distill keygen` writes them) or folders of `*.pub` files. Borrowed for
    /// the call. With keys, a bundle carrying a signature (edgelm.sig) must verify against one
    /// of them, else EDGELM_ERR_SIGNATURE. A key file that cannot be read is EDGELM_ERR_IO;
    /// one that is not an ed25519 public key in PEM is EDGELM_ERR_SIGNATURE, its message
    /// naming the file.
    pub trusted_keys: *const *const c_char,
    /// Number of entries in trusted_keys.
    pub n_trusted_keys: usize,
    /// Refuse unsigned bundles too (EDGELM_ERR_SIGNATURE); needs at least one trusted key.
    /// Default false.
    pub require_signature: bool,
}

/// Generation settings. Get defaults from edgelm_gen_params_default.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct edgelm_gen_params {
    /// Most tokens to generate (at least 1).
    pub max_new_tokens: u32,
    /// Sampling temperature; 0 = greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 = off.
    pub top_k: u32,
    /// Nucleus sampling mass; 1 = off.
    pub top_p: f32,
    /// Penalty on already seen tokens; 1 = off.
    pub repetition_penalty: f32,
    /// Sampling seed (default 0, a seed like any other): the same seed, prompt and settings
    /// give the same tokens. Unused when greedy.
    pub seed: u64,
    /// Keep generating past end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Array of n_stop_strings NUL-terminated UTF-8 stop strings, or NULL. Borrowed for the
    /// call. Generation ends when the text contains one; the stop string and anything after it
    /// are never passed to the callback (text that might begin one is held back until it is
    /// clear). Empty strings are ignored.
    pub stop_strings: *const *const c_char,
    /// Number of entries in stop_strings.
    pub n_stop_strings: usize,
    /// false (the default): edgelm_generate renders the prompt as one user turn with the
    /// bundle's chat template, as the model was trained (bundles without a template get the
    /// text as it is). true: the prompt is tokenized as given. edgelm_generate_ids ignores it.
    pub raw_prompt: bool,
}

/// What a generation cost: filled by edgelm_generate / edgelm_generate_ids on EDGELM_OK when
/// the pointer is not NULL; left as it was on any failure.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct edgelm_stats {
    /// Tokens in the prompt.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub generated_tokens: u32,
    /// Time to first token in milliseconds.
    pub ttft_ms: f64,
    /// Prompt tokens per second during prefill.
    pub prefill_tokens_per_s: f64,
    /// Generated tokens per second after the first.
    pub decode_tokens_per_s: f64,
    /// Peak resident memory of the process, in bytes.
    pub peak_rss_bytes: u64,
    /// Why generation ended.
    pub stop_reason: edgelm_stop_reason,
}

/// Called for every generated token, on the thread that called edgelm_generate, and once more
/// with `token_id` -1 if text was held back at the end (an incomplete character, or the start
/// of a stop string that never completed).
/// `piece` is the text this token completed (NUL-terminated, `piece_len` bytes without the
/// NUL, possibly empty); it is owned by edgelm and valid only during the call. An
/// end-of-sequence token is passed with an empty piece; a stop string is never passed.
/// Return true to continue, false to stop generation: the call then returns EDGELM_OK with
/// stop reason EDGELM_STOP_CANCELLED, except on a token that ends generation anyway (an
/// end-of-sequence token, or the one completing a stop string), whose own reason
/// (EDGELM_STOP_EOS, EDGELM_STOP_STRING) is kept. No call follows a false, nor a cancel
/// (edgelm_cancel, edgelm_model_free): held-back text is then dropped.
pub type edgelm_token_callback =
    Option<unsafe extern "C" fn(piece: *const c_char, piece_len: usize, token_id: i32, user_data: *mut c_void) -> bool>;

struct ModelSlot {
    model: Mutex<Model>,
    info: ModelInfo,
    cancel: Mutex<CancelState>,
}

/// What the query functions report, read once at load (so they never wait on `model`).
struct ModelInfo {
    kind: edgelm_kind,
    context_length: u32,
    vocab_size: u32,
    embedding_dim: Option<u32>,
}

impl ModelInfo {
    fn of(m: &Model) -> Self {
        match m {
            Model::CausalLm(e) => ModelInfo {
                kind: edgelm_kind::EDGELM_KIND_CAUSAL_LM,
                context_length: m.context_length() as u32,
                vocab_size: e.vocab_size() as u32,
                embedding_dim: None,
            },
            Model::Encoder(e) => ModelInfo {
                kind: edgelm_kind::EDGELM_KIND_ENCODER,
                context_length: m.context_length() as u32,
                vocab_size: e.vocab_size() as u32,
                embedding_dim: Some(e.embedding_dim() as u32),
            },
        }
    }
}

/// Whether a cancel is pending for the generate calls now inside the library.
#[derive(Default)]
struct CancelState {
    /// edgelm_generate / edgelm_generate_ids calls on this model between entry and return.
    in_progress: usize,
    /// Set by edgelm_cancel (or edgelm_model_free) while a call is in progress; cleared when
    /// the last one returns, so a cancel never reaches a later generation.
    cancelled: bool,
}

impl ModelSlot {
    fn cancel_state(&self) -> std::sync::MutexGuard<'_, CancelState> {
        self.cancel.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cancel(&self) {
        let mut c = self.cancel_state();
        if c.in_progress > 0 {
            c.cancelled = true;
        }
    }

    fn is_cancelled(&self) -> bool {
        self.cancel_state().cancelled
    }
}

/// One generate call in progress, from its entry ([`enter_slot`] counts it) to its return
/// (drop).
struct InProgress<'a>(&'a ModelSlot);

impl Drop for InProgress<'_> {
    fn drop(&mut self) {
        let mut c = self.0.cancel_state();
        c.in_progress -= 1;
        if c.in_progress == 0 {
            c.cancelled = false;
        }
    }
}

fn registry() -> &'static Mutex<HashMap<usize, Arc<ModelSlot>>> {
    static R: OnceLock<Mutex<HashMap<usize, Arc<ModelSlot>>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

// Keys start high and step by 16 so they look like aligned pointers but never alias a real one
// a caller could hold; they are never reused.
static NEXT_KEY: AtomicUsize = AtomicUsize::new(0x5EED_0000);

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: impl Into<String>) {
    let mut bytes = msg.into().into_bytes();
    bytes.retain(|&b| b != 0);
    let c = CString::new(bytes).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

fn fail(status: edgelm_status, msg: impl Into<String>) -> edgelm_status {
    set_error(msg);
    status
}

fn status_of(e: &Error) -> edgelm_status {
    match e {
        Error::Io { .. } => EDGELM_ERR_IO,
        Error::Bundle { .. } | Error::HashMismatch { .. } | Error::UnexpectedShape { .. } => EDGELM_ERR_BUNDLE,
        Error::OrtLibrary { .. }
        | Error::Ort(_)
        | Error::QuantizedTableNeedsNewerOrt { .. }
        | Error::NoExecutionProvider { .. }
        | Error::ExecutionProviderFailed { .. } => EDGELM_ERR_RUNTIME,
        Error::Signature { .. } => EDGELM_ERR_SIGNATURE,
        Error::Tokenizer(_) | Error::NoTokenizer | Error::Template(_) => EDGELM_ERR_TOKENIZER,
        Error::ContextOverflow { .. } | Error::TokenOutOfRange { .. } | Error::CacheFull { .. } => {
            EDGELM_ERR_CONTEXT_OVERFLOW
        }
        Error::WrongKind { .. } => EDGELM_ERR_UNSUPPORTED,
        _ => EDGELM_ERR_INVALID_ARGUMENT,
    }
}

fn from_error(e: Error) -> edgelm_status {
    let s = status_of(&e);
    fail(s, e.to_string())
}

/// Runs `f`, turning a panic into EDGELM_ERR_INTERNAL.
fn guard(f: impl FnOnce() -> edgelm_status) -> edgelm_status {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(s) => s,
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            fail(EDGELM_ERR_INTERNAL, format!("internal error (please report): {what}"))
        }
    }
}

fn slot(model: *const edgelm_model) -> Result<Arc<ModelSlot>, edgelm_status> {
    live_slot(model, |_| {})
}

/// The live slot of `model`, with `under_lock` run on it while the registry is still locked.
fn live_slot(model: *const edgelm_model, under_lock: impl FnOnce(&ModelSlot)) -> Result<Arc<ModelSlot>, edgelm_status> {
    if model.is_null() {
        return Err(fail(EDGELM_ERR_INVALID_HANDLE, "model handle is NULL"));
    }
    let map = registry().lock().unwrap_or_else(|e| e.into_inner());
    let slot = map.get(&(model as usize)).cloned().ok_or_else(|| {
        fail(EDGELM_ERR_INVALID_HANDLE, "model handle is not live (freed, or not from edgelm_model_load)")
    })?;
    under_lock(&slot);
    Ok(slot)
}

unsafe fn utf8<'a>(s: *const c_char, what: &str) -> Result<&'a str, edgelm_status> {
    if s.is_null() {
        return Err(fail(EDGELM_ERR_INVALID_ARGUMENT, format!("{what} is NULL")));
    }
    CStr::from_ptr(s).to_str().map_err(|e| fail(EDGELM_ERR_INVALID_UTF8, format!("{what} is not valid UTF-8: {e}")))
}

/// The library version, e.g. "0.2.0" (the EDGELM_VERSION_* macros of the header it was built
/// with). Static string; never free it. Thread-safe.
#[no_mangle]
pub extern "C" fn edgelm_version() -> *const c_char {
    static V: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");
    V.as_ptr().cast()
}

/// The message of the last failed call on the calling thread, or "" if none failed yet.
/// Owned by edgelm, never NULL: valid until the next failing edgelm call on the same thread
/// (successful calls leave it as it is) and gone when the thread exits. Copy it to keep it.
/// Thread-safe (one message per thread).
#[no_mangle]
pub extern "C" fn edgelm_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Default load options: threads 0 (one per core), EDGELM_KV_SHARED, ORT library searched.
#[no_mangle]
pub extern "C" fn edgelm_load_options_default() -> edgelm_load_options {
    edgelm_load_options {
        threads: 0,
        kv_cache: edgelm_kv_cache::EDGELM_KV_SHARED as u32,
        ort_library: std::ptr::null(),
        trusted_keys: std::ptr::null(),
        n_trusted_keys: 0,
        require_signature: false,
    }
}

/// Default generation settings: 128 new tokens, greedy, no penalties, seed 0, no stop strings,
/// the prompt rendered with the chat template.
#[no_mangle]
pub extern "C" fn edgelm_gen_params_default() -> edgelm_gen_params {
    edgelm_gen_params {
        max_new_tokens: 128,
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        repetition_penalty: 1.0,
        seed: 0,
        ignore_eos: false,
        stop_strings: std::ptr::null(),
        n_stop_strings: 0,
        raw_prompt: false,
    }
}

fn kv_cache_mode(value: u32) -> Result<KvCacheMode, edgelm_status> {
    match value {
        v if v == edgelm_kv_cache::EDGELM_KV_SHARED as u32 => Ok(KvCacheMode::Shared),
        v if v == edgelm_kv_cache::EDGELM_KV_GROWING as u32 => Ok(KvCacheMode::Growing),
        v => Err(fail(
            EDGELM_ERR_INVALID_ARGUMENT,
            format!("options->kv_cache is {v}; use EDGELM_KV_SHARED (0) or EDGELM_KV_GROWING (1)"),
        )),
    }
}

/// Opens and verifies a bundle folder of either kind (a causal LM or a sentence encoder; an
/// edgelm bundle, an onnxruntime-genai model folder or an ONNX export by Hugging Face Optimum).
///
/// `path`: NUL-terminated UTF-8, borrowed. `options`: NULL for defaults, borrowed. `out`:
/// receives the new handle on EDGELM_OK (left untouched on failure); the caller owns it and
/// must release it with edgelm_model_free. A damaged bundle (a corrupt or incomplete
/// edgelm.json, a file whose hash does not match) is EDGELM_ERR_BUNDLE; a file that cannot be
/// read at all is EDGELM_ERR_IO; a bundle refused by the signature options is
/// EDGELM_ERR_SIGNATURE; ONNX Runtime that cannot be loaded or that refuses the bundle's graph
/// is EDGELM_ERR_RUNTIME; a tokenizer.json that cannot be read is EDGELM_ERR_TOKENIZER; a
/// `path` (or `ort_library`, or a `trusted_keys` entry) that is not UTF-8 is
/// EDGELM_ERR_INVALID_UTF8; NULL `path` or `out`, or options that cannot hold (require_signature
/// without trusted_keys) are EDGELM_ERR_INVALID_ARGUMENT. Thread-safe. Loading is slow: every
/// file is hashed, except files unchanged since an earlier load found them right (recorded in
/// the user's cache folder; set the environment variable EDGELM_VERIFY=full to hash every file
/// every time, and EDGELM_CACHE_DIR to choose the folder; docs/bundle.md, "What opening a
/// bundle checks").
#[no_mangle]
pub unsafe extern "C" fn edgelm_model_load(
    path: *const c_char,
    options: *const edgelm_load_options,
    out: *mut *mut edgelm_model,
) -> edgelm_status {
    guard(|| {
        if out.is_null() {
            return fail(EDGELM_ERR_INVALID_ARGUMENT, "out is NULL");
        }
        let path = match utf8(path, "path") {
            Ok(p) => p,
            Err(s) => return s,
        };
        let o = if options.is_null() { edgelm_load_options_default() } else { *options };
        let kv_cache = match kv_cache_mode(o.kv_cache) {
            Ok(k) => k,
            Err(s) => return s,
        };
        let mut opts = EngineOptions::default().with_threads(o.threads as usize).with_kv_cache(kv_cache);
        if !o.ort_library.is_null() {
            match utf8(o.ort_library, "options->ort_library") {
                Ok(p) => opts = opts.with_ort_library(p),
                Err(s) => return s,
            }
        }
        if o.n_trusted_keys > 0 && o.trusted_keys.is_null() {
            return fail(EDGELM_ERR_INVALID_ARGUMENT, "options->trusted_keys is NULL but n_trusted_keys is not 0");
        }
        // No preallocation from the count: a garbage count must fail on a key, not abort here.
        let mut key_files = Vec::new();
        for i in 0..o.n_trusted_keys {
            match utf8(*o.trusted_keys.add(i), &format!("options->trusted_keys[{i}]")) {
                Ok(p) => key_files.push(p),
                Err(s) => return s,
            }
        }
        if o.require_signature && key_files.is_empty() {
            return fail(EDGELM_ERR_INVALID_ARGUMENT, "options->require_signature needs at least one trusted key");
        }
        match TrustedKeys::none().with_key_files(key_files) {
            Ok(trust) => opts = opts.with_trusted_keys(trust.require(o.require_signature)),
            Err(e) => return from_error(e),
        }
        match Model::open(path, &opts) {
            Ok(model) => {
                let key = NEXT_KEY.fetch_add(16, Ordering::Relaxed);
                let info = ModelInfo::of(&model);
                let slot = Arc::new(ModelSlot { model: Mutex::new(model), info, cancel: Mutex::default() });
                registry().lock().unwrap_or_else(|e| e.into_inner()).insert(key, slot);
                *out = key as *mut edgelm_model;
                EDGELM_OK
            }
            Err(e) => from_error(e),
        }
    })
}

/// Releases a model. Returns EDGELM_ERR_INVALID_HANDLE for NULL, freed or foreign handles (so
/// a double free is an error, not a crash). Never blocks: the handle is dead when this returns.
/// A generation still running on it on another thread is cancelled (it returns soon with
/// EDGELM_STOP_CANCELLED), and the model's memory is released when that call returns.
/// Thread-safe.
#[no_mangle]
pub extern "C" fn edgelm_model_free(model: *mut edgelm_model) -> edgelm_status {
    guard(|| {
        if model.is_null() {
            return fail(EDGELM_ERR_INVALID_HANDLE, "model handle is NULL");
        }
        match registry().lock().unwrap_or_else(|e| e.into_inner()).remove(&(model as usize)) {
            Some(slot) => {
                slot.cancel();
                EDGELM_OK
            }
            None => {
                fail(EDGELM_ERR_INVALID_HANDLE, "model handle is not live (double free, or not from edgelm_model_load)")
            }
        }
    })
}

/// Asks the generation in progress on `model` to stop. A generate call is in progress from
/// the moment it is entered until it returns, so a cancel that arrives while it is still
/// tokenizing or waiting is not lost: it returns EDGELM_OK with EDGELM_STOP_CANCELLED after at
/// most the token being computed (possibly before any token). With no generate call in
/// progress this does nothing: a cancel never reaches a later call. Thread-safe (takes a lock
/// briefly, so not async-signal-safe).
#[no_mangle]
pub extern "C" fn edgelm_cancel(model: *mut edgelm_model) -> edgelm_status {
    guard(|| match slot(model) {
        Ok(s) => {
            s.cancel();
            EDGELM_OK
        }
        Err(st) => st,
    })
}

/// Writes what `model` holds into `*out`. Thread-safe; never waits for a generation.
#[no_mangle]
pub unsafe extern "C" fn edgelm_model_kind(model: *const edgelm_model, out: *mut edgelm_kind) -> edgelm_status {
    query(model, out, |i| Ok(i.kind))
}

/// Writes the model's context length into `*out`: the most tokens a causal LM's prompt plus
/// its generated tokens may hold, or the most tokens an encoder reads (0 when the encoder's
/// bundle does not say). Thread-safe; never waits for a generation.
#[no_mangle]
pub unsafe extern "C" fn edgelm_model_context_length(model: *const edgelm_model, out: *mut u32) -> edgelm_status {
    query(model, out, |i| Ok(i.context_length))
}

/// Writes the size of the model's vocabulary into `*out` (valid token ids are 0 to this minus
/// one). Thread-safe; never waits for a generation.
#[no_mangle]
pub unsafe extern "C" fn edgelm_model_vocab_size(model: *const edgelm_model, out: *mut u32) -> edgelm_status {
    query(model, out, |i| Ok(i.vocab_size))
}

/// Writes the number of floats edgelm_embed returns into `*out`. Encoder bundles only: a causal
/// LM answers EDGELM_ERR_UNSUPPORTED. Thread-safe; never waits for a generation.
#[no_mangle]
pub unsafe extern "C" fn edgelm_model_embedding_dim(model: *const edgelm_model, out: *mut u32) -> edgelm_status {
    query(model, out, |i| {
        i.embedding_dim.ok_or_else(|| fail(EDGELM_ERR_UNSUPPORTED, "a causal LM has no sentence embeddings"))
    })
}

/// Reads one property of a live model, recorded when it was loaded, into `*out`.
unsafe fn query<T>(
    model: *const edgelm_model,
    out: *mut T,
    read: impl FnOnce(&ModelInfo) -> Result<T, edgelm_status>,
) -> edgelm_status {
    guard(|| {
        let slot = match slot(model) {
            Ok(s) => s,
            Err(st) => return st,
        };
        if out.is_null() {
            return fail(EDGELM_ERR_INVALID_ARGUMENT, "out is NULL");
        }
        match read(&slot.info) {
            Ok(v) => {
                *out = v;
                EDGELM_OK
            }
            Err(st) => st,
        }
    })
}

enum Prompt<'a> {
    Text(&'a str),
    Ids(&'a [u32]),
}

/// The live slot of `model`, marked in progress under the registry's lock: a cancel or free
/// that finds the handle after this call did sees the call in progress.
fn enter_slot(model: *const edgelm_model) -> Result<Arc<ModelSlot>, edgelm_status> {
    live_slot(model, |s| s.cancel_state().in_progress += 1)
}

/// Runs a generation; the handle is checked (and the call marked in progress) before the
/// prompt, which `prompt` reads from the caller's pointers.
unsafe fn generate<'a>(
    model: *mut edgelm_model,
    prompt: impl FnOnce() -> Result<Prompt<'a>, edgelm_status>,
    params: *const edgelm_gen_params,
    callback: edgelm_token_callback,
    user_data: *mut c_void,
    stats: *mut edgelm_stats,
) -> edgelm_status {
    let slot = match enter_slot(model) {
        Ok(s) => s,
        Err(st) => return st,
    };
    let _in_progress = InProgress(&slot);
    #[cfg(test)]
    tests::entered_hook();
    let prompt = match prompt() {
        Ok(p) => p,
        Err(st) => return st,
    };
    let p = if params.is_null() { edgelm_gen_params_default() } else { *params };
    if p.n_stop_strings > 0 && p.stop_strings.is_null() {
        return fail(EDGELM_ERR_INVALID_ARGUMENT, "stop_strings is NULL but n_stop_strings > 0");
    }
    let mut stops = Vec::with_capacity(p.n_stop_strings);
    for i in 0..p.n_stop_strings {
        match utf8(*p.stop_strings.add(i), "a stop string") {
            Ok(s) => stops.push(s.to_owned()),
            Err(st) => return st,
        }
    }
    let Ok(mut loaded) = slot.model.try_lock() else {
        return fail(EDGELM_ERR_BUSY, "another thread is generating with this model");
    };
    let engine = match &mut *loaded {
        Model::CausalLm(e) => e,
        Model::Encoder(_) => return fail(EDGELM_ERR_UNSUPPORTED, "this is an encoder bundle: use edgelm_embed"),
    };
    let ids = match prompt {
        Prompt::Text(t) => match engine.encode_prompt(t, p.raw_prompt) {
            Ok(ids) => ids,
            Err(e) => return from_error(e),
        },
        Prompt::Ids(ids) => ids.to_vec(),
    };
    let sampling = SamplingParams::default()
        .with_temperature(p.temperature)
        .with_top_k(p.top_k as usize)
        .with_top_p(p.top_p)
        .with_repetition_penalty(p.repetition_penalty)
        .with_seed(p.seed);
    let gp = GenerateParams::default()
        .with_max_new_tokens(p.max_new_tokens as usize)
        .with_sampling(sampling)
        .with_stop_strings(stops)
        .with_ignore_eos(p.ignore_eos);
    let mut piece = Vec::with_capacity(64);
    let result = engine.generate_until(
        &ids,
        &gp,
        || slot.is_cancelled(),
        |ev| {
            if let Some(cb) = callback {
                piece.clear();
                piece.extend_from_slice(ev.text.as_bytes());
                piece.push(0);
                let id = ev.id.map_or(-1, |i| i as i32);
                if !cb(piece.as_ptr().cast(), ev.text.len(), id, user_data) {
                    return ControlFlow::Break(());
                }
            }
            ControlFlow::Continue(())
        },
    );
    match result {
        Ok(g) => {
            if !stats.is_null() {
                *stats = edgelm_stats::from(&g);
            }
            EDGELM_OK
        }
        Err(e) => from_error(e),
    }
}

impl From<StopReason> for edgelm_stop_reason {
    fn from(r: StopReason) -> Self {
        match r {
            StopReason::Eos => edgelm_stop_reason::EDGELM_STOP_EOS,
            StopReason::StopString => edgelm_stop_reason::EDGELM_STOP_STRING,
            StopReason::MaxTokens => edgelm_stop_reason::EDGELM_STOP_MAX_TOKENS,
            StopReason::ContextFull => edgelm_stop_reason::EDGELM_STOP_CONTEXT_FULL,
            StopReason::Cancelled => edgelm_stop_reason::EDGELM_STOP_CANCELLED,
        }
    }
}

impl From<&Generation> for edgelm_stats {
    fn from(g: &Generation) -> Self {
        let m = &g.metrics;
        edgelm_stats {
            prompt_tokens: m.prompt_tokens as u32,
            generated_tokens: m.generated_tokens as u32,
            ttft_ms: m.ttft_ms,
            prefill_tokens_per_s: m.prefill_tokens_per_s,
            decode_tokens_per_s: m.decode_tokens_per_s,
            peak_rss_bytes: m.peak_rss_bytes,
            stop_reason: g.stop_reason.into(),
        }
    }
}

/// Generates a continuation of a text prompt, streaming each token to `callback`.
///
/// `model`: a live handle. `prompt`: NUL-terminated UTF-8, borrowed (the bundle needs a
/// tokenizer); by default rendered with the bundle's chat template (see
/// edgelm_gen_params.raw_prompt). An empty prompt is EDGELM_ERR_INVALID_ARGUMENT; one that
/// leaves no room in the context is EDGELM_ERR_CONTEXT_OVERFLOW. `params`: NULL for defaults,
/// borrowed; max_new_tokens 0 is EDGELM_ERR_INVALID_ARGUMENT. `callback`: may be NULL (then the
/// text is only counted in `stats`). `user_data`: passed to the callback untouched. `stats`:
/// NULL, or filled on EDGELM_OK and left as it was on failure. Blocks until generation ends.
/// One generation per model at a time: a concurrent call on the same model returns
/// EDGELM_ERR_BUSY; different models may generate in parallel on different threads.
/// A NULL or dead `model` is EDGELM_ERR_INVALID_HANDLE (checked before the other arguments);
/// a prompt or stop string that is not UTF-8 is EDGELM_ERR_INVALID_UTF8; an encoder bundle is
/// EDGELM_ERR_UNSUPPORTED; a chat template that fails to render is
/// EDGELM_ERR_TOKENIZER; ONNX Runtime failing during the generation is EDGELM_ERR_RUNTIME, and
/// a graph returning tensors of an unexpected shape EDGELM_ERR_BUNDLE.
#[no_mangle]
pub unsafe extern "C" fn edgelm_generate(
    model: *mut edgelm_model,
    prompt: *const c_char,
    params: *const edgelm_gen_params,
    callback: edgelm_token_callback,
    user_data: *mut c_void,
    stats: *mut edgelm_stats,
) -> edgelm_status {
    guard(|| generate(model, || utf8(prompt, "prompt").map(Prompt::Text), params, callback, user_data, stats))
}

/// Like edgelm_generate, with the prompt given as `n_ids` token ids (borrowed), used as they
/// are (no chat template; `n_ids` 0 is EDGELM_ERR_INVALID_ARGUMENT). Works for bundles
/// without a tokenizer (the callback's pieces are then empty, and stop_strings must be empty:
/// they are matched on text, so any is EDGELM_ERR_INVALID_ARGUMENT there).
#[no_mangle]
pub unsafe extern "C" fn edgelm_generate_ids(
    model: *mut edgelm_model,
    ids: *const u32,
    n_ids: usize,
    params: *const edgelm_gen_params,
    callback: edgelm_token_callback,
    user_data: *mut c_void,
    stats: *mut edgelm_stats,
) -> edgelm_status {
    guard(|| {
        let prompt = || {
            if ids.is_null() && n_ids > 0 {
                return Err(fail(EDGELM_ERR_INVALID_ARGUMENT, "ids is NULL but n_ids > 0"));
            }
            Ok(Prompt::Ids(if n_ids == 0 { &[] } else { std::slice::from_raw_parts(ids, n_ids) }))
        };
        generate(model, prompt, params, callback, user_data, stats)
    })
}

/// Writes the sentence embedding of `text` (NUL-terminated UTF-8, borrowed) into `out`
/// (caller-owned, `out_capacity` floats; edgelm_model_embedding_dim says how many are needed)
/// and its length into `out_len`. For encoder bundles
/// only: a causal LM answers EDGELM_ERR_UNSUPPORTED. When `out_capacity` is too small the call
/// returns EDGELM_ERR_INVALID_ARGUMENT with `*out_len` set to the length needed, before the
/// text is looked at and without running the model (pass `out` NULL and capacity 0 to ask).
/// Every other failure leaves `*out_len` untouched: a NULL `text` or `out_len`, or an empty
/// text, is EDGELM_ERR_INVALID_ARGUMENT; a text longer than the encoder reads is
/// EDGELM_ERR_CONTEXT_OVERFLOW; a text the tokenizer fails on is EDGELM_ERR_TOKENIZER.
/// Thread-safe; one call per model at a time (EDGELM_ERR_BUSY otherwise).
#[no_mangle]
pub unsafe extern "C" fn edgelm_embed(
    model: *mut edgelm_model,
    text: *const c_char,
    out: *mut f32,
    out_capacity: usize,
    out_len: *mut usize,
) -> edgelm_status {
    guard(|| {
        let slot = match slot(model) {
            Ok(s) => s,
            Err(st) => return st,
        };
        let text = match utf8(text, "text") {
            Ok(t) => t,
            Err(s) => return s,
        };
        if (out.is_null() && out_capacity > 0) || out_len.is_null() {
            return fail(EDGELM_ERR_INVALID_ARGUMENT, "out or out_len is NULL");
        }
        // The length is known from loading: a too small `out` is answered without running.
        if let Some(dim) = slot.info.embedding_dim.map(|d| d as usize).filter(|&d| d > out_capacity) {
            *out_len = dim;
            return fail(
                EDGELM_ERR_INVALID_ARGUMENT,
                format!("out holds {out_capacity} floats; the embedding has {dim}"),
            );
        }
        let Ok(mut loaded) = slot.model.try_lock() else {
            return fail(EDGELM_ERR_BUSY, "another thread is using this model");
        };
        let Model::Encoder(enc) = &mut *loaded else {
            return fail(EDGELM_ERR_UNSUPPORTED, "embeddings need an encoder bundle; this bundle is a causal LM");
        };
        match enc.embed(text) {
            Ok(v) => {
                *out_len = v.len();
                if v.len() > out_capacity {
                    return fail(
                        EDGELM_ERR_INVALID_ARGUMENT,
                        format!("out holds {out_capacity} floats; the embedding has {}", v.len()),
                    );
                }
                std::ptr::copy_nonoverlapping(v.as_ptr(), out, v.len());
                EDGELM_OK
            }
            Err(e) => from_error(e),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// Runs inside generate right after the call counts as entered (tests only).
        static ON_ENTERED: RefCell<Option<Box<dyn FnMut()>>> = RefCell::new(None);
    }

    pub(super) fn entered_hook() {
        ON_ENTERED.with(|h| {
            if let Some(f) = h.borrow_mut().as_mut() {
                f()
            }
        });
    }

    fn load(path: &std::path::Path) -> *mut edgelm_model {
        let c = CString::new(path.to_str().unwrap()).unwrap();
        let mut m = std::ptr::null_mut();
        let st = unsafe { edgelm_model_load(c.as_ptr(), std::ptr::null(), &mut m) };
        assert_eq!(st, EDGELM_OK, "{:?}", unsafe { CStr::from_ptr(edgelm_last_error()) });
        m
    }

    fn generate_ids(m: *mut edgelm_model, n: u32) -> (edgelm_status, edgelm_stats) {
        let ids = [1u32, 40, 97];
        let p = edgelm_gen_params { max_new_tokens: n, ignore_eos: true, ..edgelm_gen_params_default() };
        let mut stats = std::mem::MaybeUninit::<edgelm_stats>::zeroed();
        let st = unsafe {
            edgelm_generate_ids(m, ids.as_ptr(), ids.len(), &p, None, std::ptr::null_mut(), stats.as_mut_ptr())
        };
        (st, unsafe { stats.assume_init() })
    }

    #[test]
    fn a_cancel_that_arrives_once_generate_was_entered_stops_it() {
        let m = load(&edgelm_e2e::bundle("tiny"));
        // The cancel lands between entry and the first token, where it used to be wiped.
        let handle = m as usize;
        ON_ENTERED.with(|h| {
            *h.borrow_mut() = Some(Box::new(move || {
                assert_eq!(edgelm_cancel(handle as *mut edgelm_model), EDGELM_OK);
            }))
        });
        let (st, stats) = generate_ids(m, 20);
        ON_ENTERED.with(|h| *h.borrow_mut() = None);
        assert_eq!(st, EDGELM_OK);
        assert_eq!(stats.stop_reason, edgelm_stop_reason::EDGELM_STOP_CANCELLED);
        assert!(stats.generated_tokens <= 1, "{} tokens after the cancel", stats.generated_tokens);

        // A cancel with nothing in progress does nothing: the next call runs to its end.
        assert_eq!(edgelm_cancel(m), EDGELM_OK);
        let (st, stats) = generate_ids(m, 5);
        assert_eq!(st, EDGELM_OK);
        assert_eq!(stats.stop_reason, edgelm_stop_reason::EDGELM_STOP_MAX_TOKENS);
        assert_eq!(stats.generated_tokens, 5);
        assert_eq!(edgelm_model_free(m), EDGELM_OK);
    }

    #[test]
    fn kv_cache_values_outside_the_enum_are_refused() {
        let b = edgelm_e2e::bundle("tiny");
        let c = CString::new(b.to_str().unwrap()).unwrap();
        for bad in [2u32, 7, u32::MAX, 255] {
            let o = edgelm_load_options { kv_cache: bad, ..edgelm_load_options_default() };
            let mut m = std::ptr::null_mut();
            let st = unsafe { edgelm_model_load(c.as_ptr(), &o, &mut m) };
            assert_eq!(st, EDGELM_ERR_INVALID_ARGUMENT, "kv_cache {bad}");
            assert!(m.is_null());
            let msg = unsafe { CStr::from_ptr(edgelm_last_error()) }.to_str().unwrap().to_owned();
            assert!(msg.contains("kv_cache"), "{msg}");
        }
        for good in [edgelm_kv_cache::EDGELM_KV_SHARED, edgelm_kv_cache::EDGELM_KV_GROWING] {
            let o = edgelm_load_options { kv_cache: good as u32, ..edgelm_load_options_default() };
            let mut m = std::ptr::null_mut();
            assert_eq!(unsafe { edgelm_model_load(c.as_ptr(), &o, &mut m) }, EDGELM_OK);
            assert_eq!(edgelm_model_free(m), EDGELM_OK);
        }
    }

    #[test]
    fn a_damaged_manifest_is_edgelm_err_bundle() {
        let b = edgelm_e2e::bundle("tiny");
        let manifest = std::fs::read(b.join("edgelm.json")).unwrap();
        let mut flipped = manifest.clone();
        flipped[manifest.len() / 3] = 0xFE;
        for (name, bytes) in [("flipped", flipped), ("half", manifest[..manifest.len() / 2].to_vec())] {
            let dir = edgelm_e2e::scratch().join(format!("capi-manifest-{name}"));
            edgelm_e2e::copy_dir(&b, &dir);
            std::fs::write(dir.join("edgelm.json"), bytes).unwrap();
            let c = CString::new(dir.to_str().unwrap()).unwrap();
            let mut m = std::ptr::null_mut();
            assert_eq!(unsafe { edgelm_model_load(c.as_ptr(), std::ptr::null(), &mut m) }, EDGELM_ERR_BUNDLE, "{name}");
        }
    }

    #[test]
    fn version_macros_match_the_crate_version() {
        let v = format!("{EDGELM_VERSION_MAJOR}.{EDGELM_VERSION_MINOR}.{EDGELM_VERSION_PATCH}");
        assert_eq!(v, env!("CARGO_PKG_VERSION"));
        assert_eq!(unsafe { CStr::from_ptr(edgelm_version()) }.to_str().unwrap(), v);
    }
}
