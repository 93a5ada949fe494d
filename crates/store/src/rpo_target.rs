//! A source's own RPO target, when the operator set one through the admin
//! API: file `DATA/sources/ID/rpo-target`, a text record (`textrec.rs`) of
//! one line, `millis N`. Kept with the source's other records, so that a
//! restarted server, and in a bucket every server, applies the same target;
//! no file means the server's `--rpo-target`.

use std::time::Duration;

use blockrep_core::SourceId;

use crate::error::{Error, ErrorKind};
use crate::source_record::SourceRecord;
use crate::store::Store;

const RECORD: SourceRecord = SourceRecord {
    name: "rpo-target",
    magic: "blockrep rpo-target v1",
    title: "RPO target",
    // Far more than the record's one line: a larger file is damage.
    max_bytes: 256,
};

impl Store {
    /// The RPO target set for `source`; `None` when none is (the server's
    /// own applies).
    pub fn rpo_target(&self, source: &SourceId) -> Result<Option<Duration>, Error> {
        RECORD.read(self, source, |what, lines| {
            let millis = match lines.as_slice() {
                [line] => line
                    .strip_prefix("millis ")
                    .and_then(|n| n.parse::<u64>().ok())
                    .filter(|&n| n > 0),
                _ => None,
            };
            millis
                .map(Duration::from_millis)
                .ok_or_else(|| Error::new(ErrorKind::Corrupt, format!("{what}: bad record")))
        })
    }

    /// Durably sets (`Some`) or removes (`None`) the RPO target of
    /// `source`, kept to the millisecond. A target under a millisecond is
    /// refused (`Invalid`): it would read back as none.
    pub fn set_rpo_target(&self, source: &SourceId, target: Option<Duration>) -> Result<(), Error> {
        self.check_writable()?;
        let Some(target) = target else {
            return RECORD.remove(self, source);
        };
        let millis = u64::try_from(target.as_millis()).unwrap_or(u64::MAX);
        if millis == 0 {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!("an RPO target of {target:?} is below a millisecond"),
            ));
        }
        RECORD.write(self, source, &[format!("millis {millis}")])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{source, temp_store};

    #[test]
    fn a_target_is_kept_read_back_and_removed() {
        let (dir, store) = temp_store();
        let id = source();
        assert_eq!(store.rpo_target(&id).unwrap(), None);
        store
            .set_rpo_target(&id, Some(Duration::from_millis(90_500)))
            .unwrap();
        assert_eq!(
            store.rpo_target(&id).unwrap(),
            Some(Duration::from_millis(90_500))
        );
        // A store opened again finds it.
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            store.rpo_target(&id).unwrap(),
            Some(Duration::from_millis(90_500))
        );
        store.set_rpo_target(&id, None).unwrap();
        assert_eq!(store.rpo_target(&id).unwrap(), None);
        // Removing what is not there is no error.
        store.set_rpo_target(&id, None).unwrap();
        let below = store.set_rpo_target(&id, Some(Duration::from_micros(500)));
        assert_eq!(below.unwrap_err().kind(), ErrorKind::Invalid);
    }

    #[test]
    fn a_damaged_record_is_an_error_not_a_target() {
        let (dir, store) = temp_store();
        let id = source();
        store
            .set_rpo_target(&id, Some(Duration::from_secs(60)))
            .unwrap();
        let path = dir
            .path()
            .join("sources")
            .join(id.as_str())
            .join(RECORD.name);
        let good = std::fs::read(&path).unwrap();
        let damaged = String::from_utf8(good).unwrap().replace("60000", "90000");
        std::fs::write(&path, damaged).unwrap();
        assert_eq!(
            store.rpo_target(&id).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
        let zero = crate::textrec::seal(RECORD.magic, &["millis 0".to_owned()]);
        std::fs::write(&path, zero).unwrap();
        assert_eq!(
            store.rpo_target(&id).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
    }
}
