//! Leases: one holder at a time for a name (a source), kept in the object
//! `leases/NAME` and changed only by conditional writes, so two servers
//! that race for it never both believe they hold it.
//!
//! A lease has an expiry, which its holder pushes forward ([`Lease::renew`])
//! well before it passes, and a generation, which grows every time the
//! lease is taken (by another holder, or by the same one after a restart).
//! A holder that was paused past its expiry finds out at its next renewal:
//! the object changed, so its conditional write is refused. Expiry is judged
//! on the taker's clock: servers sharing a bucket keep their clocks in
//! step (NTP), and the expiry is long against their drift.

use bytes::Bytes;

use crate::{Bucket, Error, Version};

/// First line of a lease object: what it is and its format's version.
const MAGIC: &str = "blockrep-lease 1";
/// Attempts [`Lease::take`] makes when others change the lease meanwhile.
const TAKE_ATTEMPTS: usize = 4;

/// `now_unix_ms + ttl_ms`, refused where it would overflow.
fn expiry(now_unix_ms: u64, ttl_ms: u64) -> Result<u64, Error> {
    now_unix_ms.checked_add(ttl_ms).ok_or_else(|| {
        Error::Config(format!(
            "a lease of {ttl_ms} ms from {now_unix_ms} overflows"
        ))
    })
}

/// What a lease object says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRecord {
    pub holder: String,
    pub expires_unix_ms: u64,
    /// 1 for the first holder, one more at every take.
    pub generation: u64,
}

impl LeaseRecord {
    fn encode(&self) -> Bytes {
        Bytes::from(format!(
            "{MAGIC}\nholder={}\nexpires_unix_ms={}\ngeneration={}\n",
            self.holder, self.expires_unix_ms, self.generation
        ))
    }

    /// The lease that `data`, read from `key`, records.
    pub fn decode(key: &str, data: &[u8]) -> Result<Self, Error> {
        let malformed = |why: &str| Error::Malformed {
            key: key.to_owned(),
            why: why.to_owned(),
        };
        let text = std::str::from_utf8(data).map_err(|_| malformed("not text"))?;
        let mut lines = text.lines();
        if lines.next() != Some(MAGIC) {
            return Err(malformed("not a blockrep lease"));
        }
        let mut field = |name: &str| -> Result<String, Error> {
            let line = lines.next().ok_or_else(|| malformed("too short"))?;
            line.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix('='))
                .map(str::to_owned)
                .ok_or_else(|| malformed(&format!("no {name}")))
        };
        let holder = field("holder")?;
        let number = |text: String, name: &str| {
            text.parse::<u64>()
                .map_err(|_| malformed(&format!("{name} is not a number")))
        };
        let expires_unix_ms = number(field("expires_unix_ms")?, "expires_unix_ms")?;
        let generation = number(field("generation")?, "generation")?;
        Ok(Self {
            holder,
            expires_unix_ms,
            generation,
        })
    }
}

/// A lease this process holds, as it last wrote it. Two are equal when
/// they are the same write of the same lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    key: String,
    record: LeaseRecord,
    version: Version,
}

impl Lease {
    fn key(name: &str) -> String {
        format!("leases/{name}")
    }

    /// Takes `name`'s lease for `holder` until `now_unix_ms + ttl_ms`: when
    /// nobody holds it, or its holder let it expire (or is `holder` itself,
    /// restarted). Fails with [`Error::Held`] naming the holder otherwise.
    pub async fn take(
        bucket: &Bucket,
        name: &str,
        holder: &str,
        ttl_ms: u64,
        now_unix_ms: u64,
    ) -> Result<Self, Error> {
        if holder.is_empty() || holder.contains('\n') {
            return Err(Error::Config(format!("{holder:?} cannot hold a lease")));
        }
        let key = Self::key(name);
        let expires_unix_ms = expiry(now_unix_ms, ttl_ms)?;
        for _ in 0..TAKE_ATTEMPTS {
            let (record, written) = match bucket.get(&key).await? {
                None => {
                    let record = LeaseRecord {
                        holder: holder.to_owned(),
                        expires_unix_ms,
                        generation: 1,
                    };
                    let written = bucket.put_new(&key, record.encode()).await;
                    (record, written)
                }
                Some((data, version)) => {
                    let current = LeaseRecord::decode(&key, &data)?;
                    if current.holder != holder && current.expires_unix_ms > now_unix_ms {
                        return Err(Error::Held {
                            name: name.to_owned(),
                            holder: current.holder,
                            expires_unix_ms: current.expires_unix_ms,
                        });
                    }
                    // A generation that could wrap would let an old holder
                    // back in: refused, as a lease nobody wrote.
                    let generation =
                        current
                            .generation
                            .checked_add(1)
                            .ok_or_else(|| Error::Malformed {
                                key: key.clone(),
                                why: "the generation cannot grow".into(),
                            })?;
                    let record = LeaseRecord {
                        holder: holder.to_owned(),
                        expires_unix_ms,
                        generation,
                    };
                    let written = bucket.put_if(&key, record.encode(), &version).await;
                    (record, written)
                }
            };
            match written {
                Ok(version) => {
                    return Ok(Self {
                        key,
                        record,
                        version,
                    });
                }
                // Someone else changed it meanwhile: look again.
                Err(Error::Exists(_) | Error::Conflict(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::Conflict(key))
    }

    /// Pushes the expiry to `now_unix_ms + ttl_ms`. [`Error::Conflict`]
    /// means the lease is lost: someone took it since (this holder was
    /// paused or cut off past its expiry), and nothing may be written for
    /// it any more.
    pub async fn renew(
        &mut self,
        bucket: &Bucket,
        ttl_ms: u64,
        now_unix_ms: u64,
    ) -> Result<(), Error> {
        let record = LeaseRecord {
            expires_unix_ms: expiry(now_unix_ms, ttl_ms)?,
            ..self.record.clone()
        };
        self.version = bucket
            .put_if(&self.key, record.encode(), &self.version)
            .await?;
        self.record = record;
        Ok(())
    }

    /// Lets the lease go at once, so another holder need not wait for its
    /// expiry. A lease already lost is not touched.
    pub async fn release(self, bucket: &Bucket) -> Result<(), Error> {
        let record = LeaseRecord {
            expires_unix_ms: 0,
            ..self.record
        };
        bucket
            .put_if(&self.key, record.encode(), &self.version)
            .await?;
        Ok(())
    }

    /// The lease as this holder last wrote it.
    pub fn record(&self) -> &LeaseRecord {
        &self.record
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_anything_else_is_refused() {
        let record = LeaseRecord {
            holder: "server-a".into(),
            expires_unix_ms: 1_700_000_000_000,
            generation: 7,
        };
        let key = "leases/web";
        assert_eq!(LeaseRecord::decode(key, &record.encode()).unwrap(), record);
        for bad in [
            &b""[..],
            b"blockrep-lease 2\nholder=a\nexpires_unix_ms=1\ngeneration=1\n",
            b"blockrep-lease 1\nholder=a\nexpires_unix_ms=x\ngeneration=1\n",
            b"blockrep-lease 1\nholder=a\ngeneration=1\n",
            b"\xff\xfe",
        ] {
            assert!(LeaseRecord::decode(key, bad).is_err(), "{bad:?} accepted");
        }
    }
}
