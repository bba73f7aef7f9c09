//! Device selection: `cpu`, `cuda[:N]` or `auto`, with CUDA detected without panicking.

use std::fmt;

/// Where tensors live and ops run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl Device {
    /// CUDA device 0 where a driver and a device exist, else the CPU.
    pub fn auto() -> Device {
        match crate::cuda::probe() {
            Ok(n) if n > 0 => Device::Cuda(0),
            _ => Device::Cpu,
        }
    }

    /// Parse `cpu`, `cuda`, `cuda:N` or `auto`.
    pub fn parse(s: &str) -> Result<Device, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            "auto" => Ok(Device::auto()),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Device::Cuda(n)),
                _ => Err(format!("unknown device `{s}`: expected cpu, cuda, cuda:N, gpu or auto")),
            },
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}
