//! `--device cpu | cuda | cuda:N`.

use std::str::FromStr;

/// Where the learner's tensors live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

/// A `--device` this build or machine cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error("{0:?} is not cpu, cuda or cuda:N")]
    Syntax(String),
    #[error("{0}: this build has no CUDA support (rebuild with --features cuda)")]
    NotBuilt(DeviceSpec),
    #[error("{device}: CUDA sees {count} device(s)")]
    Absent { device: DeviceSpec, count: i64 },
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| DeviceError::Syntax(s.to_owned())),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    /// Parses `--device` (default cpu) and checks this build and machine can use it.
    pub fn resolve(flag: Option<&str>) -> Result<Self, super::ConfigError> {
        let invalid = |e: DeviceError| super::ConfigError::Invalid {
            flag: "device",
            reason: e.to_string(),
        };
        let spec: Self = flag.unwrap_or("cpu").parse().map_err(invalid)?;
        spec.to_tch().map_err(invalid)?;
        Ok(spec)
    }

    /// The tch device, if this build and machine can use it.
    pub fn to_tch(self) -> Result<tch::Device, DeviceError> {
        match self {
            Self::Cpu => Ok(tch::Device::Cpu),
            Self::Cuda(n) => {
                if !cfg!(feature = "cuda") {
                    return Err(DeviceError::NotBuilt(self));
                }
                let count = tch::Cuda::device_count();
                if (n as i64) < count {
                    Ok(tch::Device::Cuda(n))
                } else {
                    Err(DeviceError::Absent { device: self, count })
                }
            }
        }
    }
}
