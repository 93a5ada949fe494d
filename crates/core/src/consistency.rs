//! How a recovery point was taken, and so what a user may expect of it.

use std::fmt;
use std::str::FromStr;

/// The consistency of a committed root: what state of the source disk it holds.
///
/// Every root, snapshot and launch volume carries one, so that nobody hands out a
/// recovery point as more than it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Consistency {
    /// Read from a view frozen at one instant (a reflink clone, a volume
    /// snapshot, or captured writes): the disk as a power loss would leave it.
    /// A journaling file system recovers it.
    CrashConsistent,
    /// Like `CrashConsistent`, and the applications were quiesced (a pre-cutover
    /// or quiesce command ran around the view's creation).
    Quiesced,
    /// Read from the live disk over a span of time: chunks may come from different
    /// moments, so the file system on it may be torn. The default, because it
    /// claims nothing.
    #[default]
    Live,
}

impl Consistency {
    /// The label users see, in text and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CrashConsistent => "crash-consistent",
            Self::Quiesced => "quiesced",
            Self::Live => "live",
        }
    }

    /// The one-byte form used on the wire and on disk.
    pub fn to_byte(self) -> u8 {
        match self {
            Self::Live => 0,
            Self::CrashConsistent => 1,
            Self::Quiesced => 2,
        }
    }

    /// Parses the one-byte form; `None` for a byte no version wrote.
    pub fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            0 => Some(Self::Live),
            1 => Some(Self::CrashConsistent),
            2 => Some(Self::Quiesced),
            _ => None,
        }
    }

    /// Whether the point is at least crash-consistent (safe to boot from).
    pub fn is_point_in_time(self) -> bool {
        !matches!(self, Self::Live)
    }
}

impl fmt::Display for Consistency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Consistency {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "crash-consistent" => Ok(Self::CrashConsistent),
            "quiesced" => Ok(Self::Quiesced),
            "live" => Ok(Self::Live),
            other => Err(format!(
                "unknown consistency {other:?} (expected crash-consistent, quiesced or live)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_bytes_round_trip() {
        for c in [
            Consistency::CrashConsistent,
            Consistency::Quiesced,
            Consistency::Live,
        ] {
            assert_eq!(c.as_str().parse::<Consistency>(), Ok(c));
            assert_eq!(Consistency::from_byte(c.to_byte()), Some(c));
        }
        assert_eq!(Consistency::from_byte(3), None);
        assert!("torn".parse::<Consistency>().is_err());
        assert!(!Consistency::Live.is_point_in_time());
        assert!(Consistency::Quiesced.is_point_in_time());
    }
}
