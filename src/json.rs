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

/// One step of an [`IdPath`]: into an object's field, or into every element of an array.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    Key(Box<str>),
    Each,
}

/// Where a create's response shows the ids of the jobs it started: object fields and `*`
/// (every element of an array), written as a JSON pointer (`/generations/*/id`, `/*/id`,
/// `/ids/*`; `~1` stands for `/` in a field's name and `~0` for `~`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IdPath(Box<[Step]>);

impl IdPath {
    /// Every element of a top-level array: its field `id_field`, or the element itself.
    pub(crate) fn each(id_field: &str) -> Self {
        Self(Box::new([Step::Each, Step::Key(id_field.into())]))
    }

    pub(crate) fn parse(text: &str) -> Result<Self, &'static str> {
        let Some(rest) = text.strip_prefix('/') else {
            return Err("a path starts with `/`, as in `/generations/*/id`");
        };
        let mut steps = Vec::new();
        for part in rest.split('/') {
            if part.is_empty() {
                return Err("a path has no empty step (`//`, or a `/` at its end)");
            }
            // RFC 6901: `~` only as `~0` or `~1`. A field named `*` cannot be a step.
            let escapes = part.match_indices('~');
            if escapes
                .clone()
                .any(|(at, _)| !matches!(part.as_bytes().get(at + 1), Some(b'0' | b'1')))
            {
                return Err("a `~` in a path stands only as `~0` (for `~`) or `~1` (for `/`)");
            }
            steps.push(match part {
                "*" => Step::Each,
                key => Step::Key(key.replace("~1", "/").replace("~0", "~").into()),
            });
        }
        Ok(Self(steps.into()))
    }
}

/// The ids a create's response shows, as far as `body` goes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Ids {
    /// The ids found at the path, in order.
    pub(crate) ids: Vec<String>,
    /// The status beside each of them in its object (`status_field`), where there is one.
    pub(crate) statuses: Vec<Option<String>>,
    /// The top-level object's `root_field`, if it is an object and has one.
    pub(crate) root: Option<String>,
    /// Whether `body` held one whole JSON value and nothing after it.
    pub(crate) complete: bool,
}

/// The ids at `path` in `body` (at most `max` of them are kept), each with the field
/// `fields.status` of the object it is in, and the top-level object's field `fields.id`, as
/// far as `body` goes. Where `path` expects an object in an array and finds a string or a
/// number, that element is an id itself (`["gen_1", "gen_2"]`).
pub(crate) fn ids(body: &[u8], path: &IdPath, fields: Fields<'_>, max: usize) -> Ids {
    let mut found = Ids::default();
    let mut de = serde_json::Deserializer::from_slice(body);
    let read = PathSeed {
        path: &path.0,
        in_array: false,
        root: Some((fields.id, &mut found.root)),
        status: fields.status,
        out: Out {
            ids: &mut found.ids,
            statuses: &mut found.statuses,
        },
        max,
    }
    .deserialize(&mut de);
    found.complete = read.is_ok() && de.end().is_ok();
    found
}

struct PathSeed<'a, 'p> {
    path: &'p [Step],
    /// Whether the value is an element of an array the path goes through.
    in_array: bool,
    /// At the top level: the field read as a single create's id, and where it goes.
    root: Option<(&'p str, &'a mut Option<String>)>,
    /// The field read beside an id, as its job's status.
    status: &'p str,
    out: Out<'a>,
    max: usize,
}

/// Where the ids found go, and the status beside each (kept as long as the ids).
struct Out<'a> {
    ids: &'a mut Vec<String>,
    statuses: &'a mut Vec<Option<String>>,
}

impl Out<'_> {
    fn reborrow(&mut self) -> Out<'_> {
        Out {
            ids: &mut *self.ids,
            statuses: &mut *self.statuses,
        }
    }
}

impl PathSeed<'_, '_> {
    fn push(self, id: Option<String>) {
        if let Some(id) = id {
            if self.out.ids.len() < self.max {
                self.out.ids.push(id);
                self.out.statuses.push(None);
            }
        }
    }

    /// Whether a scalar found here is an id: at the path's end, or an element of an array
    /// standing where one object with the id field was expected.
    fn takes_scalar(&self) -> bool {
        self.path.is_empty() || (self.in_array && matches!(self.path, [Step::Key(_)]))
    }
}

// The batch path has seeds of its own (none of the single create's `KeySeed` and `Scalar`):
// shared, those would be called from two places, and no longer inlined into the path of every
// create's id (measured: 190 instructions a create).
impl<'de> DeserializeSeed<'de> for PathSeed<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

/// A key of an object on an [`IdPath`]: the path's next step, the top-level id field, or
/// neither.
#[derive(Clone, Copy)]
struct PathKeySeed<'p> {
    step: &'p str,
    root: &'p str,
    status: &'p str,
}

enum PathKey {
    Step,
    Root,
    Status,
    Other,
}

impl<'de> DeserializeSeed<'de> for PathKeySeed<'_> {
    type Value = PathKey;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<PathKey, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for PathKeySeed<'_> {
    type Value = PathKey;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<PathKey, E> {
        Ok(if !self.step.is_empty() && key == self.step {
            PathKey::Step
        } else if !self.root.is_empty() && key == self.root {
            PathKey::Root
        } else if !self.status.is_empty() && key == self.status {
            PathKey::Status
        } else {
            PathKey::Other
        })
    }
}

impl<'de> Visitor<'de> for PathSeed<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JSON")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Self {
            path,
            mut root,
            status,
            mut out,
            max,
            ..
        } = self;
        let (step, rest) = path
            .split_first()
            .map_or((None, path), |(s, r)| (Some(s), r));
        let name = match step {
            Some(Step::Key(name)) => &**name,
            _ => "",
        };
        // The object that holds an id (the path's last step) may hold its status too.
        let holds_id = rest.is_empty() && !name.is_empty();
        let root_field = root.as_ref().map_or("", |(field, _)| *field);
        let seed = PathKeySeed {
            step: name,
            root: root_field,
            status: if holds_id { status } else { "" },
        };
        let before = out.ids.len();
        let mut seen_status = None;
        while let Some(key) = map.next_key_seed(seed)? {
            match key {
                PathKey::Step => map.next_value_seed(PathSeed {
                    path: rest,
                    in_array: false,
                    root: None,
                    status,
                    out: out.reborrow(),
                    max,
                })?,
                PathKey::Root => {
                    let (mut id, mut no_status) = (Vec::new(), Vec::new());
                    map.next_value_seed(PathSeed {
                        path: &[],
                        in_array: false,
                        root: None,
                        status: "",
                        out: Out {
                            ids: &mut id,
                            statuses: &mut no_status,
                        },
                        max: 1,
                    })?;
                    if let Some((_, slot)) = root.as_mut() {
                        **slot = id.pop();
                    }
                }
                PathKey::Status => {
                    seen_status = map.next_value::<Scalar>()?.0;
                }
                PathKey::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        if out.ids.len() == before + 1 {
            if let Some(slot) = out.statuses.last_mut() {
                *slot = seen_status;
            }
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some((Step::Each, rest)) = self.path.split_first() else {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            return Ok(());
        };
        let (mut out, max, status) = (self.out, self.max, self.status);
        while seq
            .next_element_seed(PathSeed {
                path: rest,
                in_array: true,
                root: None,
                status,
                out: out.reborrow(),
                max,
            })?
            .is_some()
        {}
        Ok(())
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        if self.takes_scalar() {
            self.push(Some(v.to_owned()));
        }
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        if self.takes_scalar() {
            self.push(Some(v.to_string()));
        }
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        if self.takes_scalar() {
            self.push(Some(v.to_string()));
        }
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
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

    fn batch(body: &[u8], path: &str) -> Ids {
        ids(body, &IdPath::parse(path).unwrap(), FIELDS, usize::MAX)
    }

    #[test]
    fn ids_at_a_path_each_element_or_the_element_itself() {
        let body =
            br#"{"batch":"b1","generations":[{"status":"PENDING","id":"a"},{"id":2},{"x":1}]}"#;
        let seen = batch(body, "/generations/*/id");
        assert_eq!(seen.ids, ["a", "2"]);
        // The status beside each id, where its object has one.
        assert_eq!(seen.statuses, [Some("PENDING".to_owned()), None]);
        assert!(seen.complete);
        assert_eq!(seen.root, None);
        let seen = ids(
            br#"["a","b",{"id":"c"},null,1.5]"#,
            &IdPath::each("id"),
            FIELDS,
            9,
        );
        assert_eq!(seen.ids, ["a", "b", "c"]);
        assert_eq!(batch(br#"{"ids":["x","y"]}"#, "/ids/*").ids, ["x", "y"]);
        // A single create's object: no ids at the path, the top-level field read as before.
        let seen = ids(
            br#"{"id":"one","status":"PENDING"}"#,
            &IdPath::each("id"),
            FIELDS,
            9,
        );
        assert_eq!((seen.ids.len(), seen.root.as_deref()), (0, Some("one")));
        // At most `max` kept; a cut body keeps what came before the cut, and says so.
        assert_eq!(
            ids(br#"["a","b","c"]"#, &IdPath::each("id"), FIELDS, 2).ids,
            ["a", "b"]
        );
        let seen = batch(br#"[{"id":"a"},{"id":"b"},{"id":"c"#, "/*/id");
        assert_eq!(seen.ids, ["a", "b"]);
        assert!(!seen.complete);
        assert!(!batch(br#"[{"id":"a"}] trailing"#, "/*/id").complete);
        assert_eq!(
            IdPath::parse("/a~1b/*").unwrap().0[0],
            Step::Key("a/b".into())
        );
        for bad in ["", "id", "/", "/a//b", "/a/", "/a~2/*", "/a~"] {
            assert!(IdPath::parse(bad).is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        #[test]
        fn no_input_panics(body in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = object(&body, FIELDS);
            let _ = array(&body, FIELDS);
            let _ = ids(&body, &IdPath::each("id"), FIELDS, 8);
            let _ = ids(&body, &IdPath::parse("/a/*/b/*").unwrap(), FIELDS, 8);
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
