//! [`HeapBox`]: a value in the shared heap, freed when dropped; and [`Heap::alloc_layout`], the
//! `Layout` face of the heap.

use std::alloc::Layout;
use std::ops::{Deref, DerefMut};
use std::os::fd::OwnedFd;
use std::ptr::NonNull;

use memplane_core::channel::Channel;

use crate::heap::{AllocError, Heap};

impl<C: Channel> Heap<C>
where
    C::Fds: From<Vec<OwnedFd>> + Into<Vec<OwnedFd>>,
{
    /// Allocates for `layout` (size 0 is refused: there is no zero-sized shared block).
    pub fn alloc_layout(&self, layout: Layout) -> Result<NonNull<u8>, AllocError> {
        self.malloc(layout.size(), layout.align())
    }

    /// Moves `value` into the shared heap.
    pub fn boxed<T>(&self, value: T) -> Result<HeapBox<'_, T, C>, AllocError> {
        let l = Layout::new::<T>();
        let p = self
            .alloc_layout(Layout::from_size_align(l.size().max(1), l.align()).unwrap_or(l))?
            .cast::<T>();
        // SAFETY: `p` is a fresh allocation sized and aligned for T.
        unsafe { p.as_ptr().write(value) };
        Ok(HeapBox { heap: self, ptr: p })
    }
}

/// A `T` in the shared heap (its address is valid in every process), dropped and freed with the
/// box.
pub struct HeapBox<'h, T, C: Channel>
where
    C::Fds: From<Vec<OwnedFd>> + Into<Vec<OwnedFd>>,
{
    heap: &'h Heap<C>,
    ptr: NonNull<T>,
}

impl<T, C: Channel> HeapBox<'_, T, C>
where
    C::Fds: From<Vec<OwnedFd>> + Into<Vec<OwnedFd>>,
{
    /// The address, to hand to another process.
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// Gives up ownership: the block stays allocated (another process will free it).
    pub fn into_raw(self) -> NonNull<T> {
        let p = self.ptr;
        std::mem::forget(self);
        p
    }
}

impl<T, C: Channel> Deref for HeapBox<'_, T, C>
where
    C::Fds: From<Vec<OwnedFd>> + Into<Vec<OwnedFd>>,
{
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the box owns an initialised T at `ptr` until it is dropped.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T, C: Channel> DerefMut for HeapBox<'_, T, C>
where
    C::Fds: From<Vec<OwnedFd>> + Into<Vec<OwnedFd>>,
{
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as above, and `&mut self` makes the access exclusive.
        unsafe { self.ptr.as_mut() }
    }
}

impl<T, C: Channel> Drop for HeapBox<'_, T, C>
where
    C::Fds: From<Vec<OwnedFd>> + Into<Vec<OwnedFd>>,
{
    fn drop(&mut self) {
        // SAFETY: the box owns the T; it is dropped once, here.
        unsafe { self.ptr.as_ptr().drop_in_place() };
        let _ = self.heap.free(self.ptr.cast());
    }
}
