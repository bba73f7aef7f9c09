//! Device buffers of the CUDA backend: device memory on a GPU, or host memory on the emulated
//! device. Ops see one type, [`CudaBuf`], whichever device layer made it.

use crate::cuda::CudaElem;
use cudarc::driver::CudaSlice;

/// A buffer of `E` on a CUDA device (real or emulated). Made by [`crate::Cuda`]'s `zeros` and
/// `upload`; read back with `download`.
pub struct CudaBuf<E> {
    pub(crate) mem: Mem<E>,
    /// Elements the buffer holds (a zero-length buffer on a real device is a one-element
    /// allocation, since the driver cannot allocate zero bytes).
    pub(crate) len: usize,
}

pub(crate) enum Mem<E> {
    /// Device memory (cudarc tracks the stream's reads and writes of it).
    Real(CudaSlice<E>),
    /// Host memory standing in for device memory on the emulated device.
    #[cfg_attr(not(feature = "emulator"), allow(dead_code))]
    Emu(Vec<E>),
}

impl<E> CudaBuf<E> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The device memory, on a real device (`None` on the emulated one, and for an empty buffer).
    pub fn as_cuda_slice(&self) -> Option<&CudaSlice<E>> {
        match &self.mem {
            Mem::Real(s) if self.len > 0 => Some(s),
            _ => None,
        }
    }
    /// The allocation behind the buffer, a one-element one for an empty buffer (for launches,
    /// which never index an empty buffer).
    pub(crate) fn device_slice(&self) -> Option<&CudaSlice<E>> {
        match &self.mem {
            Mem::Real(s) => Some(s),
            Mem::Emu(_) => None,
        }
    }
    /// The host memory of an emulated buffer (`None` on a real device).
    pub(crate) fn host(&self) -> Option<&[E]> {
        match &self.mem {
            Mem::Emu(v) => Some(v),
            Mem::Real(_) => None,
        }
    }
    pub(crate) fn host_mut(&mut self) -> Option<&mut [E]> {
        match &mut self.mem {
            Mem::Emu(v) => Some(v),
            Mem::Real(_) => None,
        }
    }
    pub(crate) fn device_slice_mut(&mut self) -> Option<&mut CudaSlice<E>> {
        match &mut self.mem {
            Mem::Real(s) => Some(s),
            Mem::Emu(_) => None,
        }
    }
    /// Whether the buffer's first element is 16-byte aligned (vector loads, cp.async): always on a
    /// real device (the driver's allocations are 256-byte aligned), the host address on the
    /// emulated one.
    pub fn aligned16(&self) -> bool {
        match &self.mem {
            Mem::Real(_) => true,
            Mem::Emu(v) => (v.as_ptr() as usize).is_multiple_of(16),
        }
    }
    /// Whether this buffer lives on the emulated device.
    pub fn is_emulated(&self) -> bool {
        matches!(self.mem, Mem::Emu(_))
    }
}

impl<E: CudaElem> std::fmt::Debug for CudaBuf<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.is_emulated() { "emulated" } else { "device" };
        write!(f, "CudaBuf<{}>({} elements, {kind})", E::NAME, self.len())
    }
}

/// A device-side copy (on a real device: an allocation and a copy on the buffer's stream;
/// panics where the driver fails, as cudarc's `CudaSlice::clone` does).
impl<E: CudaElem> Clone for CudaBuf<E> {
    fn clone(&self) -> Self {
        let mem = match &self.mem {
            Mem::Real(s) => Mem::Real(s.clone()),
            Mem::Emu(v) => Mem::Emu(v.clone()),
        };
        CudaBuf { mem, len: self.len }
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::elementwise::ElementwiseKernel;
    use crate::ops::gelu::{GeluKernel, GeluKind};
    use crate::ops::matmul::{MatmulKernel, MatmulParams};
    use crate::testing::cuda_or_skip;

    /// Empty buffers work as on the CPU: they upload, download, and ops over zero elements succeed
    /// (or are refused exactly as the CPU refuses them) (the driver cannot allocate zero bytes; a real device's
    /// empty buffer is a hidden one-element allocation).
    #[test]
    fn cuda_zero_length_buffers_work_as_on_the_cpu() {
        let Some(dev) = cuda_or_skip("cuda::buf::cuda_zero_length_buffers_work_as_on_the_cpu") else { return };
        let x = dev.upload::<f32>(&[]).unwrap();
        assert_eq!((x.len(), x.is_empty()), (0, true));
        assert!(dev.download(&x).unwrap().is_empty());
        let mut y = dev.zeros::<f32>(0).unwrap();
        dev.gelu_fwd(GeluKind::Tanh, &x, &mut y).unwrap();
        dev.memset_zeros(&mut y).unwrap();
        assert!(dev.download(&y.clone()).unwrap().is_empty());
        // An empty product is refused on both devices alike (the shared shape check).
        let b = dev.upload(&[1.0f32; 6]).unwrap();
        let mut c = dev.zeros::<f32>(0).unwrap();
        let p = MatmulParams::new(0, 2, 3);
        let on_cuda = dev.matmul_fwd(&p, &x, &b, &mut c).unwrap_err().to_string();
        let on_cpu = crate::Cpu.matmul_fwd(&p, &[], &[1.0f32; 6], &mut []).unwrap_err().to_string();
        assert_eq!(on_cuda, on_cpu);
        let mut z = dev.zeros::<f32>(0).unwrap();
        dev.add_fwd(&x, &y, &mut z).unwrap();
        assert!(dev.download(&z).unwrap().is_empty());
    }

    /// An unfilled buffer (an output its kernel overwrites) holds no zeros: on the emulated device
    /// every byte is 0xFF, so an element a kernel skipped reads as NaN (f32, bf16) or the largest
    /// integer; a kernel's write replaces it all. On a GPU its contents are whatever was there.
    #[test]
    fn cuda_unfilled_buffers_are_poisoned_on_the_emulated_device_and_overwritten_by_a_kernel() {
        let test = "cuda::buf::cuda_unfilled_buffers_are_poisoned_on_the_emulated_device_and_overwritten_by_a_kernel";
        let Some(dev) = cuda_or_skip(test) else { return };
        let (x, y) = (dev.upload(&[1.0f32, 2.0, 3.0]).unwrap(), dev.upload(&[0.5f32, 0.25, -1.0]).unwrap());
        let mut z = dev.unfilled::<f32>(3).unwrap();
        if dev.is_emulated() {
            assert!(dev.download(&z).unwrap().iter().all(|v| v.is_nan()));
            let b = dev.download(&dev.unfilled::<half::bf16>(5).unwrap()).unwrap();
            assert!(b.iter().all(|v| v.is_nan()), "{b:?}");
            assert_eq!(dev.download(&dev.unfilled::<u32>(2).unwrap()).unwrap(), [u32::MAX; 2]);
            assert_eq!(dev.unfilled::<f32>(0).unwrap().len(), 0);
        }
        dev.add_fwd(&x, &y, &mut z).unwrap();
        assert_eq!(dev.download(&z).unwrap(), [1.5, 2.25, 2.0]);
    }
}
