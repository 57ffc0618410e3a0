//! Reading a job's id and status out of a JSON body, or out of its first bytes: values are
//! kept as they are parsed, so a body cut short still gives what came before the cut.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// A job as a response shows it: its id and status, when present as strings (or, for ids,
/// numbers).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Seen {
    pub(crate) id: Option<String>,
    pub(crate) status: Option<String>,
}

/// The fields to look for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fields<'a> {
    pub(crate) id: &'a str,
    pub(crate) status: &'a str,
}

/// The job in a JSON object (`{"id": .., "status": ..}`), as far as `body` goes.
pub(crate) fn object(body: &[u8], fields: Fields<'_>) -> Seen {
    let mut seen = Seen::default();
    let mut de = serde_json::Deserializer::from_slice(body);
    // An error (a cut body, bad JSON) leaves what was read before it.
    let _ = ObjectSeed {
        fields,
        out: &mut seen,
    }
    .deserialize(&mut de);
    seen
}

/// A string (or number) field of a JSON object, as far as `body` goes.
pub(crate) fn field(body: &[u8], name: &str) -> Option<String> {
    // The id is looked for first, so `name` as the status field too catches nothing else.
    object(
        body,
        Fields {
            id: name,
            status: name,
        },
    )
    .id
}

/// The jobs in a JSON array of objects, as far as `body` goes. A job cut in two is left out.
pub(crate) fn array(body: &[u8], fields: Fields<'_>) -> Vec<Seen> {
    let mut jobs = Vec::new();
    let mut de = serde_json::Deserializer::from_slice(body);
    let _ = de.deserialize_seq(ArrayVisitor {
        fields,
        out: &mut jobs,
    });
    jobs
}

struct ObjectSeed<'a, 'f> {
    fields: Fields<'f>,
    out: &'a mut Seen,
}

impl<'de> DeserializeSeed<'de> for ObjectSeed<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ObjectSeed<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key_seed(KeySeed(self.fields))? {
            match key {
                Key::Id => self.out.id = map.next_value::<Scalar>()?.0,
                Key::Status => self.out.status = map.next_value::<Scalar>()?.0,
                Key::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

enum Key {
    Id,
    Status,
    Other,
}

/// Tells the wanted keys from the others without allocating.
struct KeySeed<'f>(Fields<'f>);

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = Key;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Key, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = Key;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Key, E> {
        Ok(if key == self.0.id {
            Key::Id
        } else if key == self.0.status {
            Key::Status
        } else {
            Key::Other
        })
    }
}

struct ArrayVisitor<'a, 'f> {
    fields: Fields<'f>,
    out: &'a mut Vec<Seen>,
}

impl<'de> Visitor<'de> for ArrayVisitor<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON array")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        loop {
            let mut seen = Seen::default();
            let seed = ObjectSeed {
                fields: self.fields,
                out: &mut seen,
            };
            match seq.next_element_seed(seed)? {
                Some(()) => self.out.push(seen),
                None => return Ok(()),
            }
        }
    }
}

/// A string or number as text; anything else as nothing.
struct Scalar(Option<String>);

impl<'de> de::Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ScalarVisitor)
    }
}

struct ScalarVisitor;

impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = Scalar;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string or a number")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
        Ok(Scalar(Some(v.to_owned())))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
        Ok(Scalar(Some(v.to_string())))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
        Ok(Scalar(Some(v.to_string())))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Scalar, E> {
        Ok(Scalar(None))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Scalar, E> {
        Ok(Scalar(None))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Scalar, E> {
        Ok(Scalar(None))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Scalar, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Scalar(None))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Scalar, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Scalar(None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIELDS: Fields<'static> = Fields {
        id: "id",
        status: "status",
    };

    #[test]
    fn reads_id_and_status_wherever_they_are() {
        let body = br#"{"model":"x","input":[{"type":"video"}],"status":"PENDING","id":"gen_1"}"#;
        assert_eq!(
            object(body, FIELDS),
            Seen {
                id: Some("gen_1".into()),
                status: Some("PENDING".into())
            }
        );
        assert_eq!(object(br#"{"id": 42}"#, FIELDS).id.as_deref(), Some("42"));
    }

    #[test]
    fn a_cut_body_gives_what_came_before_the_cut() {
        let body = br#"{"id":"gen_1","status":"PROCESSING","input":[{"type":"vid"#;
        let seen = object(body, FIELDS);
        assert_eq!(seen.id.as_deref(), Some("gen_1"));
        assert_eq!(seen.status.as_deref(), Some("PROCESSING"));
        assert_eq!(object(br#"{"status":"PEND"#, FIELDS), Seen::default());
    }

    #[test]
    fn garbage_gives_nothing_and_never_panics() {
        for body in [
            &b""[..],
            b"null",
            b"[1,2]",
            b"{\"id\":{\"a\":1}}",
            b"\xff\xfe",
            b"{{{{",
        ] {
            assert_eq!(object(body, FIELDS).id, None);
        }
    }

    #[test]
    fn arrays_give_each_whole_job() {
        let body =
            br#"[{"id":"a","status":"COMPLETED"},{"id":"b","status":"PENDING"},{"id":"c","sta"#;
        let jobs = array(body, FIELDS);
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[0].id.as_deref(), Some("a"));
        assert_eq!(jobs[1].status.as_deref(), Some("PENDING"));
        assert!(array(b"{\"not\":\"an array\"}", FIELDS).is_empty());
    }

    proptest::proptest! {
        #[test]
        fn no_input_panics(body in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = object(&body, FIELDS);
            let _ = array(&body, FIELDS);
        }

        #[test]
        fn every_prefix_of_a_job_is_read_without_panic(cut in 0usize..80) {
            let body = br#"[{"id":"gen_1","status":"COMPLETED","input":[1,{"a":"b"}]},{"id":"gen_2"}]"#;
            let cut = cut.min(body.len());
            let _ = array(&body[..cut], FIELDS);
            let _ = object(&body[1..cut.max(1)], FIELDS);
        }
    }
}
