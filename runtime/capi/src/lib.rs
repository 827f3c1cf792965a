//! The C ABI of the edgelm runtime: `libedgelm.so` / `libedgelm.a` with the header
//! `include/edgelm.h` (generated from this file by cbindgen; a test keeps them in step).
//!
//! Conventions, the same for every function:
//! - Handles are opaque. A model handle is a key into a registry, not a pointer to memory, so a
//!   freed, foreign or NULL handle is reported as `EDGELM_ERR_INVALID_HANDLE` instead of being
//!   dereferenced. Keys are never reused.
//! - Every function returns an `edgelm_status`; on failure the calling thread's
//!   `edgelm_last_error` says why. No Rust panic crosses the boundary: one is caught and
//!   reported as `EDGELM_ERR_INTERNAL`.
//! - Strings passed in are NUL-terminated UTF-8 and only borrowed for the call. Strings passed
//!   out are owned by the library (see each function for how long they stay valid).
#![allow(non_camel_case_types)]
#![allow(clippy::missing_safety_doc)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::ops::ControlFlow;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use edgelm_runtime::decoder::{DecoderOptions, KvCacheMode};
use edgelm_runtime::encoder::Encoder;
use edgelm_runtime::{Engine, EngineOptions, Error, GenerateParams, SamplingParams, StopReason};

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
    /// ONNX Runtime could not be loaded or failed while running the model.
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

/// KV cache strategy (in `edgelm_load_options`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum edgelm_kv_cache {
    /// Preallocated and updated in place (fast; the default).
    EDGELM_KV_SHARED = 0,
    /// Present outputs fed back as past inputs (works with any graph; copies every step).
    EDGELM_KV_GROWING = 1,
}

/// Opaque model handle. Create with edgelm_model_load, destroy with edgelm_model_free.
#[repr(C)]
pub struct edgelm_model {
    _private: [u8; 0],
}

/// Options for edgelm_model_load. Get defaults from edgelm_load_options_default.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct edgelm_load_options {
    /// Intra-op threads; 0 = one per physical core.
    pub threads: u32,
    /// KV cache strategy.
    pub kv_cache: edgelm_kv_cache,
    /// Path of libonnxruntime.so to load, or NULL to search (EDGELM_ORT_LIB, ORT_DYLIB_PATH,
    /// next to the executable, the system). Only the first successful load in a process counts.
    pub ort_library: *const c_char,
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
    /// Sampling seed.
    pub seed: u64,
    /// Keep generating past end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Array of n_stop_strings NUL-terminated UTF-8 stop strings, or NULL. Borrowed for the call.
    pub stop_strings: *const *const c_char,
    /// Number of entries in stop_strings.
    pub n_stop_strings: usize,
}

/// What a generation cost (filled by edgelm_generate when the pointer is not NULL).
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
/// NUL, possibly empty); it is owned by edgelm and valid only during the call. Return true to
/// continue, false to stop generation (the call then returns EDGELM_OK with stop reason
/// EDGELM_STOP_CANCELLED).
pub type edgelm_token_callback =
    Option<unsafe extern "C" fn(piece: *const c_char, piece_len: usize, token_id: i32, user_data: *mut c_void) -> bool>;

/// What a handle holds: a generator or an encoder, by the bundle's kind.
enum Loaded {
    Causal(Box<Engine>),
    Encoder(Box<Encoder>),
}

struct ModelSlot {
    model: Mutex<Loaded>,
    cancel: AtomicBool,
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
        Error::OrtLibrary { .. } | Error::Ort(_) => EDGELM_ERR_RUNTIME,
        Error::Tokenizer(_) | Error::NoTokenizer | Error::Template(_) => EDGELM_ERR_TOKENIZER,
        Error::ContextOverflow { .. } | Error::TokenOutOfRange { .. } | Error::CacheFull { .. } => {
            EDGELM_ERR_CONTEXT_OVERFLOW
        }
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
    if model.is_null() {
        return Err(fail(EDGELM_ERR_INVALID_HANDLE, "model handle is NULL"));
    }
    let map = registry().lock().unwrap_or_else(|e| e.into_inner());
    map.get(&(model as usize)).cloned().ok_or_else(|| {
        fail(EDGELM_ERR_INVALID_HANDLE, "model handle is not live (freed, or not from edgelm_model_load)")
    })
}

unsafe fn utf8<'a>(s: *const c_char, what: &str) -> Result<&'a str, edgelm_status> {
    if s.is_null() {
        return Err(fail(EDGELM_ERR_INVALID_ARGUMENT, format!("{what} is NULL")));
    }
    CStr::from_ptr(s).to_str().map_err(|e| fail(EDGELM_ERR_INVALID_UTF8, format!("{what} is not valid UTF-8: {e}")))
}

/// The library version, e.g. "0.1.0". Static string; never free it. Thread-safe.
#[no_mangle]
pub extern "C" fn edgelm_version() -> *const c_char {
    static V: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");
    V.as_ptr().cast()
}

/// The message of the last failed call on this thread ("" if none). Owned by edgelm; valid
/// until the next failing edgelm call on the same thread. Thread-safe (per-thread storage).
#[no_mangle]
pub extern "C" fn edgelm_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Default load options: threads 0 (one per core), shared KV cache, ORT library searched.
#[no_mangle]
pub extern "C" fn edgelm_load_options_default() -> edgelm_load_options {
    edgelm_load_options { threads: 0, kv_cache: edgelm_kv_cache::EDGELM_KV_SHARED, ort_library: std::ptr::null() }
}

/// Default generation settings: 128 new tokens, greedy, no penalties, no stop strings.
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
    }
}

/// Opens and verifies a bundle folder (edgelm bundle or onnxruntime-genai model folder).
///
/// `path`: NUL-terminated UTF-8, borrowed. `options`: NULL for defaults, borrowed. `out`:
/// receives the new handle on EDGELM_OK (left untouched on failure); the caller owns it and
/// must release it with edgelm_model_free. Thread-safe; loading is slow (verifies hashes).
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
        let ort_lib = if o.ort_library.is_null() {
            None
        } else {
            match utf8(o.ort_library, "options->ort_library") {
                Ok(p) => Some(PathBuf::from(p)),
                Err(s) => return s,
            }
        };
        let opts = EngineOptions {
            ort_lib,
            decoder: DecoderOptions {
                threads: o.threads as usize,
                kv_cache: match o.kv_cache {
                    edgelm_kv_cache::EDGELM_KV_SHARED => KvCacheMode::Shared,
                    edgelm_kv_cache::EDGELM_KV_GROWING => KvCacheMode::Growing,
                },
                ..DecoderOptions::default()
            },
        };
        let dir = std::path::Path::new(path);
        let is_encoder = dir.join(edgelm_runtime::bundle::MANIFEST).exists()
            && edgelm_runtime::bundle::read_manifest_kind(dir).is_ok_and(|k| k == "encoder");
        let loaded = if is_encoder {
            Encoder::open(dir, &opts).map(|e| Loaded::Encoder(Box::new(e)))
        } else {
            Engine::open(dir, &opts).map(|e| Loaded::Causal(Box::new(e)))
        };
        match loaded {
            Ok(model) => {
                let key = NEXT_KEY.fetch_add(16, Ordering::Relaxed);
                let slot = Arc::new(ModelSlot { model: Mutex::new(model), cancel: AtomicBool::new(false) });
                registry().lock().unwrap_or_else(|e| e.into_inner()).insert(key, slot);
                *out = key as *mut edgelm_model;
                EDGELM_OK
            }
            Err(e) => from_error(e),
        }
    })
}

/// Releases a model. Returns EDGELM_ERR_INVALID_HANDLE for NULL, freed or foreign handles (so
/// a double free is an error, not a crash). A generation running on another thread finishes
/// first; the memory is released when it returns. Thread-safe.
#[no_mangle]
pub extern "C" fn edgelm_model_free(model: *mut edgelm_model) -> edgelm_status {
    guard(|| {
        if model.is_null() {
            return fail(EDGELM_ERR_INVALID_HANDLE, "model handle is NULL");
        }
        match registry().lock().unwrap_or_else(|e| e.into_inner()).remove(&(model as usize)) {
            Some(_) => EDGELM_OK,
            None => {
                fail(EDGELM_ERR_INVALID_HANDLE, "model handle is not live (double free, or not from edgelm_model_load)")
            }
        }
    })
}

/// Asks the generation running on `model` (on any thread) to stop; it returns after the token
/// in progress with stop reason EDGELM_STOP_CANCELLED. Without a running generation this does
/// nothing. Thread-safe and async-signal-unsafe (takes a lock briefly).
#[no_mangle]
pub extern "C" fn edgelm_cancel(model: *mut edgelm_model) -> edgelm_status {
    guard(|| match slot(model) {
        Ok(s) => {
            s.cancel.store(true, Ordering::SeqCst);
            EDGELM_OK
        }
        Err(st) => st,
    })
}

enum Prompt<'a> {
    Text(&'a str),
    Ids(&'a [u32]),
}

unsafe fn generate(
    model: *mut edgelm_model,
    prompt: Prompt<'_>,
    params: *const edgelm_gen_params,
    callback: edgelm_token_callback,
    user_data: *mut c_void,
    stats: *mut edgelm_stats,
) -> edgelm_status {
    let slot = match slot(model) {
        Ok(s) => s,
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
        Loaded::Causal(e) => e,
        Loaded::Encoder(_) => return fail(EDGELM_ERR_UNSUPPORTED, "this is an encoder bundle: use edgelm_embed"),
    };
    let ids = match prompt {
        Prompt::Text(t) => match engine.encode(t) {
            Ok(ids) => ids,
            Err(e) => return from_error(e),
        },
        Prompt::Ids(ids) => ids.to_vec(),
    };
    let gp = GenerateParams {
        max_new_tokens: p.max_new_tokens as usize,
        sampling: SamplingParams {
            temperature: p.temperature,
            top_k: p.top_k as usize,
            top_p: p.top_p,
            repetition_penalty: p.repetition_penalty,
            seed: p.seed,
        },
        stop_strings: stops,
        ignore_eos: p.ignore_eos,
    };
    slot.cancel.store(false, Ordering::SeqCst);
    let mut piece = Vec::with_capacity(64);
    let result = engine.generate(&ids, &gp, |ev| {
        if let Some(cb) = callback {
            piece.clear();
            piece.extend_from_slice(ev.text.as_bytes());
            piece.push(0);
            let id = ev.id.map_or(-1, |i| i as i32);
            if !cb(piece.as_ptr().cast(), ev.text.len(), id, user_data) {
                return ControlFlow::Break(());
            }
        }
        if slot.cancel.load(Ordering::SeqCst) {
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    });
    match result {
        Ok(g) => {
            if !stats.is_null() {
                let m = &g.metrics;
                *stats = edgelm_stats {
                    prompt_tokens: m.prompt_tokens as u32,
                    generated_tokens: m.generated_tokens as u32,
                    ttft_ms: m.ttft_ms,
                    prefill_tokens_per_s: m.prefill_tokens_per_s,
                    decode_tokens_per_s: m.decode_tokens_per_s,
                    peak_rss_bytes: m.peak_rss_bytes,
                    stop_reason: match g.stop_reason {
                        StopReason::Eos => edgelm_stop_reason::EDGELM_STOP_EOS,
                        StopReason::StopString => edgelm_stop_reason::EDGELM_STOP_STRING,
                        StopReason::MaxTokens => edgelm_stop_reason::EDGELM_STOP_MAX_TOKENS,
                        StopReason::ContextFull => edgelm_stop_reason::EDGELM_STOP_CONTEXT_FULL,
                        StopReason::Cancelled => edgelm_stop_reason::EDGELM_STOP_CANCELLED,
                    },
                };
            }
            EDGELM_OK
        }
        Err(e) => from_error(e),
    }
}

/// Generates a continuation of a text prompt, streaming each token to `callback`.
///
/// `model`: a live handle. `prompt`: NUL-terminated UTF-8, borrowed (the bundle needs a
/// tokenizer). `params`: NULL for defaults, borrowed. `callback`: may be NULL (then the text is
/// only counted in `stats`). `user_data`: passed to the callback untouched. `stats`: NULL or
/// filled on EDGELM_OK. Blocks until generation ends. One generation per model at a time:
/// a concurrent call on the same model returns EDGELM_ERR_BUSY; different models may generate
/// in parallel on different threads.
#[no_mangle]
pub unsafe extern "C" fn edgelm_generate(
    model: *mut edgelm_model,
    prompt: *const c_char,
    params: *const edgelm_gen_params,
    callback: edgelm_token_callback,
    user_data: *mut c_void,
    stats: *mut edgelm_stats,
) -> edgelm_status {
    guard(|| {
        let prompt = match utf8(prompt, "prompt") {
            Ok(p) => p,
            Err(s) => return s,
        };
        generate(model, Prompt::Text(prompt), params, callback, user_data, stats)
    })
}

/// Like edgelm_generate, with the prompt given as `n_ids` token ids (borrowed). Works for
/// bundles without a tokenizer (the callback's pieces are then empty).
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
        if ids.is_null() && n_ids > 0 {
            return fail(EDGELM_ERR_INVALID_ARGUMENT, "ids is NULL but n_ids > 0");
        }
        let ids: &[u32] = if n_ids == 0 { &[] } else { std::slice::from_raw_parts(ids, n_ids) };
        generate(model, Prompt::Ids(ids), params, callback, user_data, stats)
    })
}

/// Writes the sentence embedding of `text` (NUL-terminated UTF-8, borrowed) into `out`
/// (caller-owned, `out_capacity` floats) and its length into `out_len`. For encoder bundles
/// only: a causal LM answers EDGELM_ERR_UNSUPPORTED. When `out_capacity` is too small the call
/// returns EDGELM_ERR_INVALID_ARGUMENT with `*out_len` set to the length needed (pass
/// `out` NULL and capacity 0 to ask). Thread-safe; one call per model at a time
/// (EDGELM_ERR_BUSY otherwise).
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
        let Ok(mut loaded) = slot.model.try_lock() else {
            return fail(EDGELM_ERR_BUSY, "another thread is using this model");
        };
        let Loaded::Encoder(enc) = &mut *loaded else {
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
