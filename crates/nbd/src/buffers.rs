//! Buffers for write payloads and read replies, reused within a connection.
//!
//! A 1 MiB request would otherwise allocate a fresh megabyte, which the
//! allocator maps from the kernel (page faults, pages zeroed) and which was
//! then zeroed once more before the payload or the export's bytes replaced
//! every byte of it. A reused buffer already holds the length it needs:
//! resizing it writes nothing, and the read that follows overwrites it all.

use std::sync::Mutex;

/// Buffers smaller than this are left to the allocator, which serves them
/// from its own free lists cheaply.
const POOLED_MIN_BYTES: usize = 64 * 1024;
/// Bytes of free buffers a connection keeps at most: a client with 16
/// requests of 1 MiB in flight (fio's and QEMU's usual depth) finds one for
/// each of them, read replies and write payloads alike. Less than the
/// connection's in-flight budget (`Limits::in_flight_bytes_max`, 64 MiB),
/// which bounds what its buffers hold while they are in use.
const KEPT_BYTES_MAX: usize = 32 << 20;

/// Free buffers of one connection.
#[derive(Debug, Default)]
pub(crate) struct Buffers {
    free: Mutex<(Vec<Vec<u8>>, usize)>,
}

impl Buffers {
    /// A buffer of `len` bytes whose content is unspecified (old bytes or
    /// zeroes): the caller overwrites all of it.
    pub(crate) fn take(&self, len: usize) -> Vec<u8> {
        if len >= POOLED_MIN_BYTES {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            let (buffers, kept) = &mut *free;
            if let Some(at) = buffers.iter().position(|b| b.capacity() >= len) {
                let mut buffer = buffers.swap_remove(at);
                *kept -= buffer.capacity();
                drop(free);
                // Only bytes past the buffer's old length are written.
                buffer.resize(len, 0);
                return buffer;
            }
        }
        vec![0; len]
    }

    /// Keeps `buffer` for a later request, within the connection's bound.
    pub(crate) fn give(&self, buffer: Vec<u8>) {
        let capacity = buffer.capacity();
        if capacity < POOLED_MIN_BYTES {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let (buffers, kept) = &mut *free;
        if *kept + capacity <= KEPT_BYTES_MAX {
            *kept += capacity;
            buffers.push(buffer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_buffers_are_reused_within_the_bound_and_small_ones_are_not() {
        let buffers = Buffers::default();
        let big = buffers.take(1 << 20);
        let address = big.as_ptr();
        buffers.give(big);
        let again = buffers.take(512 * 1024);
        assert_eq!(again.as_ptr(), address, "the freed buffer is reused");
        assert_eq!(again.len(), 512 * 1024);
        let small = buffers.take(4096);
        buffers.give(small);
        assert!(buffers.free.lock().unwrap().0.is_empty());
        // Past the bound, buffers are dropped.
        for _ in 0..16 {
            buffers.give(vec![0; 1 << 20]);
        }
        assert!(buffers.free.lock().unwrap().1 <= KEPT_BYTES_MAX);
    }
}
