//! Running Rust code without Ruby's GVL.

use std::ffi::c_void;

/// Runs `f` without the GVL, so other Ruby threads (Puma's, the app's) keep
/// running while it blocks, e.g. while the proxy drains. `f` must not touch
/// Ruby: without the GVL no Ruby API is safe to call.
pub fn without_gvl<F: FnOnce() -> R, R>(f: F) -> R {
    struct Call<F, R> {
        f: Option<F>,
        result: Option<std::thread::Result<R>>,
    }
    unsafe extern "C" fn trampoline<F: FnOnce() -> R, R>(data: *mut c_void) -> *mut c_void {
        // SAFETY: `data` is the `Call` passed below, alive for the call.
        let call = unsafe { &mut *(data as *mut Call<F, R>) };
        if let Some(f) = call.f.take() {
            // Unwinding through Ruby's C frames is undefined behaviour; the
            // panic is caught here and resumed on the Rust side below.
            call.result = Some(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
        }
        std::ptr::null_mut()
    }
    let mut call = Call {
        f: Some(f),
        result: None,
    };
    // SAFETY: the trampoline only touches `call`, which outlives the call;
    // no unblocking function is given, so Ruby waits for it to return.
    unsafe {
        rb_sys::rb_thread_call_without_gvl(
            Some(trampoline::<F, R>),
            &mut call as *mut Call<F, R> as *mut c_void,
            None,
            std::ptr::null_mut(),
        );
    }
    match call.result.expect("the trampoline ran") {
        Ok(result) => result,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}
