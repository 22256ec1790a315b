//! Status codes, the thread-local last error message, and the panic boundary that every
//! export runs inside.

use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// The result of every fallible call. The values are part of the ABI: they are explicit
/// and never reused; new codes get new numbers.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EsdStatus {
    /// Success.
    Ok = 0,
    /// A required pointer argument was NULL.
    NullArgument = 1,
    /// An argument or parameter value is invalid (see the last error message).
    InvalidArgument = 2,
    /// A caller buffer is smaller than the result; nothing was written.
    BufferTooSmall = 3,
    /// A file could not be read, or a model folder lacks a file.
    Io = 4,
    /// `scheduler_config.json` or `esddpm.json` is invalid.
    Config = 5,
    /// An ONNX model could not be parsed or prepared (corrupt, truncated, unsupported).
    ModelLoad = 6,
    /// A model's inputs or outputs do not fit the pipeline.
    ModelSignature = 7,
    /// Running a model failed.
    Inference = 8,
    /// A model produced NaN or infinity.
    NonFinite = 9,
    /// The run was cancelled with `esd_pipeline_cancel`.
    Cancelled = 10,
    /// The function is not in this build (the sampler-only library has no runtime).
    Unsupported = 11,
    /// A call came out of order (a sampler step before its input was read, ...).
    InvalidState = 12,
    /// A string argument is not valid UTF-8.
    InvalidUtf8 = 13,
    /// Rust panicked inside the library; the panic was caught at the boundary. The
    /// objects passed to the call should be freed.
    Panic = 14,
    /// Loading the model or running the generation would need more memory than the
    /// limit (`EsdLoadParams.memory_limit`, `EsdSamplerParams.memory_limit`) allows;
    /// nothing was allocated for it.
    MemoryLimit = 15,
    /// The prior's output is outside the range its config declares (`output_range` in
    /// esddpm.json): the model file and the config do not belong together.
    PriorRange = 16,
}

impl EsdStatus {
    /// A fixed, human-readable name of the status.
    pub fn describe(self) -> &'static core::ffi::CStr {
        match self {
            EsdStatus::Ok => c"ok",
            EsdStatus::NullArgument => c"a required pointer argument is NULL",
            EsdStatus::InvalidArgument => c"invalid argument",
            EsdStatus::BufferTooSmall => c"the output buffer is too small",
            EsdStatus::Io => c"file or model folder could not be read",
            EsdStatus::Config => c"invalid model folder config",
            EsdStatus::ModelLoad => c"the ONNX model could not be loaded",
            EsdStatus::ModelSignature => c"a model has the wrong inputs or outputs",
            EsdStatus::Inference => c"running a model failed",
            EsdStatus::NonFinite => c"a model produced NaN or infinity",
            EsdStatus::Cancelled => c"cancelled",
            EsdStatus::Unsupported => c"not supported by this build",
            EsdStatus::InvalidState => c"call out of order",
            EsdStatus::InvalidUtf8 => c"a string is not valid UTF-8",
            EsdStatus::Panic => c"internal error (panic caught)",
            EsdStatus::MemoryLimit => c"over the memory limit",
            EsdStatus::PriorRange => c"the prior's output is outside its declared range",
        }
    }
}

/// A failed call: its status and the detail for `esd_last_error_message`.
#[derive(Debug)]
pub(crate) struct Failure {
    pub status: EsdStatus,
    pub message: String,
}

impl Failure {
    pub(crate) fn new(status: EsdStatus, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::new(EsdStatus::InvalidArgument, message)
    }
}

impl From<esddpm_core::Error> for Failure {
    fn from(e: esddpm_core::Error) -> Self {
        let status = match e {
            esddpm_core::Error::NonFiniteModelOutput { .. } => EsdStatus::NonFinite,
            _ => EsdStatus::InvalidArgument,
        };
        Failure::new(status, e.to_string())
    }
}

#[cfg(feature = "runtime")]
impl From<esddpm_runtime::Error> for Failure {
    fn from(e: esddpm_runtime::Error) -> Self {
        use esddpm_runtime::Error as E;
        let status = match &e {
            E::Io { .. } | E::Folder { .. } | E::Dataset { .. } => EsdStatus::Io,
            E::Config { .. } => EsdStatus::Config,
            E::ModelLoad { .. } => EsdStatus::ModelLoad,
            E::ModelSignature { .. } => EsdStatus::ModelSignature,
            E::Inference { .. } => EsdStatus::Inference,
            E::NonFiniteOutput { .. } => EsdStatus::NonFinite,
            E::Cancelled { .. } => EsdStatus::Cancelled,
            E::MemoryLimit { .. } => EsdStatus::MemoryLimit,
            E::PriorOutputRange { .. } => EsdStatus::PriorRange,
            E::Core(esddpm_core::Error::NonFiniteModelOutput { .. }) => EsdStatus::NonFinite,
            _ => EsdStatus::InvalidArgument,
        };
        Failure::new(status, e.to_string())
    }
}

pub(crate) type CallResult = Result<(), Failure>;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    let c = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|l| *l.borrow_mut() = c);
}

/// Runs an export's body inside the panic boundary: `Ok` -> `ESD_STATUS_OK` (and the
/// last error is cleared), a failure -> its status (and the message is kept for
/// `esd_last_error_message`), a panic -> `ESD_STATUS_PANIC`.
pub(crate) fn guard(f: impl FnOnce() -> CallResult) -> EsdStatus {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => {
            set_last_error("");
            EsdStatus::Ok
        }
        Ok(Err(fail)) => {
            set_last_error(&fail.message);
            fail.status
        }
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(&format!("panic inside esddpm: {msg}"));
            EsdStatus::Panic
        }
    }
}

/// Runs a function that cannot report a status (a `_free`) inside the panic boundary.
pub(crate) fn guard_void(f: impl FnOnce()) {
    let _ = catch_unwind(AssertUnwindSafe(f));
}

/// A fixed description of `status` (a static string; never NULL). Unknown values give
/// "unknown status".
#[no_mangle]
pub extern "C" fn esd_status_str(status: u32) -> *const c_char {
    const ALL: [EsdStatus; 15] = [
        EsdStatus::Ok,
        EsdStatus::NullArgument,
        EsdStatus::InvalidArgument,
        EsdStatus::BufferTooSmall,
        EsdStatus::Io,
        EsdStatus::Config,
        EsdStatus::ModelLoad,
        EsdStatus::ModelSignature,
        EsdStatus::Inference,
        EsdStatus::NonFinite,
        EsdStatus::Cancelled,
        EsdStatus::Unsupported,
        EsdStatus::InvalidState,
        EsdStatus::InvalidUtf8,
        EsdStatus::Panic,
    ];
    ALL.iter()
        .find(|s| **s as u32 == status)
        .map_or(c"unknown status".as_ptr(), |s| s.describe().as_ptr())
}

/// The detail of the last failed call on this thread ("" after a successful call). The
/// string stays valid until the next esddpm call on the same thread; copy it to keep it.
#[no_mangle]
pub extern "C" fn esd_last_error_message() -> *const c_char {
    LAST_ERROR.with(|l| l.borrow().as_ptr())
}

/// The body of every `_init` function: writes the defaults of a parameter struct.
///
/// # Safety
/// `p` must be NULL or point to a writable `T`.
pub(crate) unsafe fn init_params<T: Default>(p: *mut T) -> EsdStatus {
    guard(|| {
        non_null(p, "params")?;
        p.write(T::default());
        Ok(())
    })
}

/// Checks that a pointer argument is not NULL.
pub(crate) fn non_null<T>(p: *const T, name: &str) -> Result<(), Failure> {
    if p.is_null() {
        Err(Failure::new(
            EsdStatus::NullArgument,
            format!("{name} is NULL"),
        ))
    } else {
        Ok(())
    }
}

/// A caller slice from a pointer and length (NULL only with length 0).
///
/// # Safety
/// `p` must point to `len` readable values when not NULL.
pub(crate) unsafe fn slice<'a, T>(p: *const T, len: usize, name: &str) -> Result<&'a [T], Failure> {
    if len == 0 {
        return Ok(&[]);
    }
    non_null(p, name)?;
    Ok(std::slice::from_raw_parts(p, len))
}

/// Writes `src` to the caller's buffer `dst` of `len` values, or fails with
/// `ESD_STATUS_BUFFER_TOO_SMALL` without writing.
///
/// # Safety
/// `dst` must point to `len` writable values.
pub(crate) unsafe fn write_out<T: Copy>(
    src: &[T],
    dst: *mut T,
    len: usize,
    name: &str,
) -> CallResult {
    non_null(dst, name)?;
    if len < src.len() {
        return Err(Failure::new(
            EsdStatus::BufferTooSmall,
            format!("{name} holds {len} values; the result needs {}", src.len()),
        ));
    }
    std::slice::from_raw_parts_mut(dst, src.len()).copy_from_slice(src);
    Ok(())
}

/// Reads a C string argument (used by the runtime API).
///
/// # Safety
/// `p` must be NULL or a NUL-terminated string.
#[cfg(feature = "runtime")]
pub(crate) unsafe fn c_str<'a>(p: *const c_char, name: &str) -> Result<&'a str, Failure> {
    non_null(p, name)?;
    std::ffi::CStr::from_ptr(p)
        .to_str()
        .map_err(|e| Failure::new(EsdStatus::InvalidUtf8, format!("{name}: {e}")))
}

/// The C API's default memory limit (`memory_limit` 0): 4 GiB, the runtime's default
/// (the sampler-only build has no runtime to ask).
const DEFAULT_MEMORY_LIMIT: u64 = 4 << 30;
#[cfg(feature = "runtime")]
const _: () = assert!(DEFAULT_MEMORY_LIMIT == esddpm_runtime::memory::DEFAULT_MEMORY_LIMIT);

/// A params struct's `memory_limit`: 0 means the default.
pub(crate) fn memory_limit_or_default(limit: u64) -> u64 {
    if limit == 0 {
        DEFAULT_MEMORY_LIMIT
    } else {
        limit
    }
}

/// Reads a versioned parameter struct whose first field is `uint32_t struct_size`: the
/// first `struct_size` bytes come from the caller (a struct from an older header, at
/// least `min_size` bytes, leaves the newer fields at their defaults); `NULL` gives the
/// defaults.
///
/// # Safety
/// `p` must be NULL or point to `struct_size` readable bytes.
pub(crate) unsafe fn read_params<T: Copy>(
    p: *const T,
    defaults: T,
    min_size: usize,
    name: &str,
) -> Result<T, Failure> {
    if p.is_null() {
        return Ok(defaults);
    }
    let size = std::ptr::read_unaligned(p as *const u32) as usize;
    if size < min_size || size > std::mem::size_of::<T>() {
        return Err(Failure::invalid(format!(
            "{name}.struct_size is {size}; expected {} (call the _init function first)",
            std::mem::size_of::<T>()
        )));
    }
    let mut out = defaults;
    std::ptr::copy_nonoverlapping(p as *const u8, &mut out as *mut T as *mut u8, size);
    // The struct_size field keeps the library's size, so a copy is complete.
    std::ptr::write_unaligned(
        &mut out as *mut T as *mut u32,
        std::mem::size_of::<T>() as u32,
    );
    Ok(out)
}
