//! `Ints`: integer tensors (token ids, targets, masks, positions) that take part in ops but are
//! never differentiated. A host copy is kept beside the device buffer for validation and counts.

use crate::error::{Error, Result};
use std::rc::Rc;
use std::sync::Arc;
use tuna_kernels::{Alloc, Elem};

struct Inner<B: Alloc<T>, T: Elem> {
    shape: Vec<usize>,
    host: Vec<T>,
    data: B::Owned,
}

/// An integer tensor on backend `B` (cheap to clone).
pub struct Ints<B: Alloc<T>, T: Elem> {
    inner: Rc<Inner<B, T>>,
}

impl<B: Alloc<T>, T: Elem> Clone for Ints<B, T> {
    fn clone(&self) -> Self {
        Ints { inner: self.inner.clone() }
    }
}

impl<B: Alloc<T>, T: Elem> Ints<B, T> {
    /// Copy `values` (of `shape`) to the device.
    pub fn new(dev: &Arc<B>, shape: &[usize], values: &[T]) -> Result<Self> {
        let expected: usize = shape.iter().product();
        if expected != values.len() {
            return Err(Error::Data {
                name: "integer tensor".into(),
                len: values.len(),
                shape: shape.to_vec(),
                expected,
            });
        }
        Ok(Ints {
            inner: Rc::new(Inner { shape: shape.to_vec(), host: values.to_vec(), data: dev.from_host(values)? }),
        })
    }
    pub fn shape(&self) -> &[usize] {
        &self.inner.shape
    }
    /// The values, from the host copy.
    pub fn host(&self) -> &[T] {
        &self.inner.host
    }
    /// The device buffer the kernels take.
    pub fn buf(&self) -> &B::Buf<T> {
        B::buf(&self.inner.data)
    }
}
