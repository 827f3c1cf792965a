//! KV caches of several sequences in one buffer per layer, so that their decode steps can run as
//! one batch on the session.
//!
//! Each past-key and past-value tensor of the graph gets one buffer of
//! `[slots, kv_heads, capacity, head_size]` floats; a sequence owns one slot. A step over slots
//! `first..first + n` binds a view of those `n` slots (contiguous in every buffer) as both the
//! past input and the present output, so the attention operator appends in place exactly as it
//! does for a lone sequence ([`crate::decoder::KvCacheMode::Shared`]).
//!
//! The buffers are allocated zeroed, which the allocator serves from untouched pages for
//! buffers this large: memory is committed as positions are first written (and then kept for
//! the arena's life), not for every slot at full capacity up front. An allocation the system
//! refuses is an error, not an abort.

use std::alloc::Layout;
use std::collections::HashMap;
use std::ptr::NonNull;

use ort::memory::{Allocator, MemoryInfo};
use ort::session::{IoBinding, Session};
use ort::value::DynValue;
use ort::AsPointer;

use crate::error::{Error, Result};

/// The KV caches of up to `slots` sequences of `capacity` positions each.
pub(crate) struct KvArena {
    // Bindings hold tensor views into `buffers`: declared first so they are dropped first.
    bindings: HashMap<(usize, usize), IoBinding>,
    buffers: Vec<Buffer>,
    /// (past input, present output) names, one pair per buffer.
    names: Vec<(String, String)>,
    slots: usize,
    capacity: usize,
    kv_heads: usize,
    head_size: usize,
    allocator: Allocator,
}

impl KvArena {
    /// Buffers for `names` (past input, present output), each holding `slots` sequences.
    pub(crate) fn new(
        names: Vec<(String, String)>,
        slots: usize,
        kv_heads: usize,
        capacity: usize,
        head_size: usize,
    ) -> Option<Self> {
        let len = slots.checked_mul(kv_heads)?.checked_mul(capacity)?.checked_mul(head_size)?;
        let buffers = names.iter().map(|_| Buffer::zeroed(len)).collect::<Option<Vec<_>>>()?;
        Some(KvArena {
            bindings: HashMap::new(),
            buffers,
            names,
            slots,
            capacity,
            kv_heads,
            head_size,
            allocator: Allocator::default(),
        })
    }

    /// Sequences the arena holds.
    pub(crate) fn slots(&self) -> usize {
        self.slots
    }

    /// Positions each sequence can hold.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    fn slot_len(&self) -> usize {
        self.kv_heads * self.capacity * self.head_size
    }

    /// The binding whose past and present tensors are slots `first..first + n`, made on first
    /// use and kept: a step rebinds only its token inputs and logits.
    pub(crate) fn binding(&mut self, session: &Session, first: usize, n: usize) -> Result<&mut IoBinding> {
        if n == 0 || first + n > self.slots {
            return Err(Error::InvalidRequest(format!(
                "slots {first}..{} are outside the KV arena of {} sequences",
                first + n,
                self.slots
            )));
        }
        if !self.bindings.contains_key(&(first, n)) {
            let shape = [n as i64, self.kv_heads as i64, self.capacity as i64, self.head_size as i64];
            let offset = first * self.slot_len();
            let info = self.allocator.memory_info();
            let mut binding = session.create_binding()?;
            for (buffer, (past, present)) in self.buffers.iter().zip(&self.names) {
                let mut view = view(buffer, offset, shape, info, &self.allocator)?;
                binding.bind_input(past.as_str(), &view)?;
                binding.bind_output(present.as_str(), &mut view)?;
            }
            self.bindings.insert((first, n), binding);
        }
        Ok(self.bindings.get_mut(&(first, n)).expect("inserted above"))
    }

    /// Exchanges the first `positions` positions of slots `a` and `b` (every layer and head):
    /// how a sequence moves down when a slot below it frees, keeping the occupied slots
    /// contiguous, while what the other slot held stays available.
    pub(crate) fn swap_slots(&mut self, a: usize, b: usize, positions: usize) {
        let (lo, hi) = (a.min(b), a.max(b));
        assert!(hi < self.slots, "slot {hi} outside the arena");
        if lo == hi {
            return;
        }
        let (slot_len, row, n) = (self.slot_len(), self.capacity * self.head_size, positions * self.head_size);
        assert!(n <= row, "more positions than a slot holds");
        for buffer in &self.buffers {
            for h in 0..self.kv_heads {
                let (a, b) = (lo * slot_len + h * row, hi * slot_len + h * row);
                // SAFETY: both ranges lie inside the buffer (slot and head indices are in
                // range, n <= row) and do not overlap (different slots); no session runs while
                // the worker that owns the arena swaps.
                unsafe {
                    std::ptr::swap_nonoverlapping(buffer.ptr.as_ptr().add(a), buffer.ptr.as_ptr().add(b), n);
                }
            }
        }
    }
}

/// Zeroed floats owned through a raw pointer: ONNX Runtime writes through views of it, so the
/// arena never makes a Rust reference to the contents that those writes would alias.
struct Buffer {
    ptr: NonNull<f32>,
    len: usize,
}

// SAFETY: the buffer is plain memory owned by one arena, which one thread uses at a time.
unsafe impl Send for Buffer {}

impl Buffer {
    /// `len` zeroed floats, or None when the system refuses the memory.
    fn zeroed(len: usize) -> Option<Buffer> {
        let layout = Layout::array::<f32>(len.max(1)).ok()?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        NonNull::new(ptr.cast::<f32>()).map(|ptr| Buffer { ptr, len })
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        let layout = Layout::array::<f32>(self.len.max(1)).expect("made with this layout");
        // SAFETY: allocated in `zeroed` with the same layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr().cast(), layout) }
    }
}

/// A tensor of `shape` over `buffer[offset..]`, without copying.
fn view(
    buffer: &Buffer,
    offset: usize,
    shape: [i64; 4],
    info: &MemoryInfo<'_>,
    allocator: &Allocator,
) -> Result<DynValue> {
    let len = shape.iter().product::<i64>() as usize;
    assert!(offset + len <= buffer.len, "view past the end of its buffer");
    let mut raw: *mut ort::sys::OrtValue = std::ptr::null_mut();
    // SAFETY: the pointer and length lie inside `buffer`, whose allocation never moves and
    // outlives the bindings holding the view (field order above).
    // ONNX Runtime does not take ownership of the data; releasing the value leaves it alone.
    let status = unsafe {
        (ort::api().CreateTensorWithDataAsOrtValue)(
            info.ptr(),
            buffer.ptr.as_ptr().add(offset).cast(),
            len * std::mem::size_of::<f32>(),
            shape.as_ptr(),
            shape.len(),
            ort::sys::ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
            &mut raw,
        )
    };
    // SAFETY: the status comes straight from the call above.
    unsafe { ort::Error::result_from_status(status) }?;
    let ptr = NonNull::new(raw).ok_or_else(|| Error::InvalidRequest("ONNX Runtime made no KV view".into()))?;
    // SAFETY: a fresh tensor value we own; `allocator` is the CPU allocator its memory info
    // describes. Wrapped this way (not as a borrowed view) the binding holds it as it is
    // instead of copying it, which would break the in-place append.
    Ok(unsafe { DynValue::from_ptr(ptr, Some(allocator)) })
}
