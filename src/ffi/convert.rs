//! Checked conversions of C arguments: NULL and invalid UTF-8 become statuses.

use std::ffi::{c_char, CStr};

use super::panic::FfiResult;
use super::status::{
    fail, WPS_STATUS_INVALID_ARGUMENT, WPS_STATUS_INVALID_UTF8, WPS_STATUS_NULL_ARG,
};

/// Borrows a NUL-terminated UTF-8 string argument named `what`.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string valid for `'a`.
pub(crate) unsafe fn str_arg<'a>(p: *const c_char, what: &str) -> FfiResult<&'a str> {
    if p.is_null() {
        return Err(fail(WPS_STATUS_NULL_ARG, format!("`{what}` is NULL")));
    }
    CStr::from_ptr(p).to_str().map_err(|e| {
        fail(
            WPS_STATUS_INVALID_UTF8,
            format!("`{what}` is not UTF-8: {e}"),
        )
    })
}

/// Borrows a byte buffer argument; `p` may be NULL only when `len` is 0.
///
/// # Safety
/// `p` is NULL or points to `len` readable bytes valid for `'a`.
pub(crate) unsafe fn bytes_arg<'a>(p: *const u8, len: usize, what: &str) -> FfiResult<&'a [u8]> {
    if p.is_null() {
        return if len == 0 {
            Ok(&[])
        } else {
            Err(fail(
                WPS_STATUS_NULL_ARG,
                format!("`{what}` is NULL with a length of {len}"),
            ))
        };
    }
    if len > isize::MAX as usize {
        return Err(fail(
            WPS_STATUS_INVALID_ARGUMENT,
            format!("`{what}` is too long"),
        ));
    }
    Ok(std::slice::from_raw_parts(p, len))
}

/// Borrows an output array of `len` elements aligned to `align` (at least `T`'s), or
/// none when `p` is NULL (its length is then ignored).
///
/// # Safety
/// `p` is NULL or points to `len` writable elements valid for `'a`.
pub(crate) unsafe fn array_out<'a, T>(
    p: *mut T,
    len: usize,
    align: usize,
    what: &str,
) -> FfiResult<&'a mut [T]> {
    if p.is_null() {
        return Ok(&mut []);
    }
    let align = align.max(std::mem::align_of::<T>());
    if (p as usize) % align != 0 {
        return Err(fail(
            WPS_STATUS_INVALID_ARGUMENT,
            format!("`{what}` is not {align}-byte aligned"),
        ));
    }
    if len
        .checked_mul(std::mem::size_of::<T>())
        .is_none_or(|bytes| bytes > isize::MAX as usize)
    {
        return Err(fail(
            WPS_STATUS_INVALID_ARGUMENT,
            format!("`{what}` is too long"),
        ));
    }
    Ok(std::slice::from_raw_parts_mut(p, len))
}

/// Borrows the object behind an opaque handle.
///
/// # Safety
/// `p` is NULL or a handle of type `T` obtained from this library and not freed.
pub(crate) unsafe fn handle_arg<'a, T>(p: *const T, what: &str) -> FfiResult<&'a T> {
    p.as_ref()
        .ok_or_else(|| fail(WPS_STATUS_NULL_ARG, format!("`{what}` is NULL")))
}

/// Mutably borrows the object behind an opaque handle.
///
/// # Safety
/// `p` is NULL or a handle of type `T` obtained from this library, not freed and not
/// used by another thread during the call.
pub(crate) unsafe fn handle_mut<'a, T>(p: *mut T, what: &str) -> FfiResult<&'a mut T> {
    p.as_mut()
        .ok_or_else(|| fail(WPS_STATUS_NULL_ARG, format!("`{what}` is NULL")))
}

/// Writes an output argument (only on success, by the caller's choice of call site).
///
/// # Safety
/// `p` is NULL or valid for a write of `T`.
pub(crate) unsafe fn write_out<T>(p: *mut T, value: T, what: &str) -> FfiResult {
    if p.is_null() {
        return Err(fail(WPS_STATUS_NULL_ARG, format!("`{what}` is NULL")));
    }
    p.write(value);
    Ok(())
}

/// Writes an optional output argument: nothing when `p` is NULL.
///
/// # Safety
/// `p` is NULL or valid for a write of `T`.
pub(crate) unsafe fn write_optional<T>(p: *mut T, value: T) {
    if !p.is_null() {
        p.write(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_and_bad_utf8_are_statuses() {
        unsafe {
            assert_eq!(str_arg(std::ptr::null(), "x"), Err(WPS_STATUS_NULL_ARG));
            let bad = b"\xff\xfe\0";
            assert_eq!(
                str_arg(bad.as_ptr().cast(), "x"),
                Err(WPS_STATUS_INVALID_UTF8)
            );
            assert_eq!(str_arg(c"ok".as_ptr(), "x"), Ok("ok"));
            assert_eq!(bytes_arg(std::ptr::null(), 0, "d"), Ok(&[][..]));
            assert_eq!(
                bytes_arg(std::ptr::null(), 3, "d"),
                Err(WPS_STATUS_NULL_ARG)
            );
            assert_eq!(
                write_out(std::ptr::null_mut::<u32>(), 1, "o"),
                Err(WPS_STATUS_NULL_ARG)
            );
        }
    }
}
