//! A complete walk over a libpg_query parse tree.
//!
//! `pg_query`'s own `nodes()` iterator deliberately skips parts of the tree (for example a
//! `SELECT`'s `LIMIT`, `VALUES` lists and window clauses), so a `set_config` call there would
//! go unseen. Every protobuf type of the parse tree derives `serde::Serialize`, and serde's
//! derive serializes every field of every struct, so driving the derived impls with a
//! serializer that writes nothing gives a walk that cannot miss a field, including fields a
//! future libpg_query adds. The walk allocates nothing but its path stack.
//!
//! Depth: prost refuses to decode a tree deeper than 100 messages (the parse then fails), so
//! the recursion here is bounded too.

use std::fmt;
use std::ops::ControlFlow;

use serde::ser::{self, Serialize};

/// One step of the way from the statement root to a value: the struct being walked (its
/// Rust type name, e.g. `"FuncCall"`) and the field of it currently being walked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Step {
    pub node: &'static str,
    pub field: &'static str,
}

impl Step {
    pub fn is(&self, node: &str, field: &str) -> bool {
        self.node == node && self.field == field
    }
}

/// A scalar reached by the walk. Floats, bytes and unit values carry nothing the guard
/// looks at and are not reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Leaf<'a> {
    Str(&'a str),
    Int(i64),
    Bool(bool),
}

/// Receives the walk. `path` ends with the struct (and field) that holds the value;
/// on `enter`/`leave` it ends with the struct's parent. `Break` stops the walk.
pub(super) trait Visit {
    fn enter(&mut self, path: &[Step], node: &'static str) -> ControlFlow<()>;
    fn leave(&mut self, path: &[Step], node: &'static str) -> ControlFlow<()>;
    fn leaf(&mut self, path: &[Step], leaf: Leaf<'_>) -> ControlFlow<()>;
}

/// How a walk ended early.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Stopped {
    /// The visitor returned `Break`.
    ByVisitor,
    /// A `Serialize` impl failed (not expected for parse trees); the caller fails closed.
    Failed,
}

/// Walks `tree` depth-first in field order, reporting to `visitor`.
pub(super) fn walk<T: Serialize + ?Sized, V: Visit>(
    tree: &T,
    visitor: &mut V,
) -> Result<(), Stopped> {
    let mut walker = Walker {
        visitor,
        path: Vec::with_capacity(32),
    };
    tree.serialize(&mut walker).map_err(|e| e.0)
}

struct Walker<'v, V> {
    visitor: &'v mut V,
    path: Vec<Step>,
}

impl<V: Visit> Walker<'_, V> {
    fn leaf(&mut self, leaf: Leaf<'_>) -> Result<(), WalkError> {
        check(self.visitor.leaf(&self.path, leaf))
    }

    fn enter(&mut self, node: &'static str) -> Result<(), WalkError> {
        check(self.visitor.enter(&self.path, node))?;
        self.path.push(Step { node, field: "" });
        Ok(())
    }

    fn field<T: Serialize + ?Sized>(
        &mut self,
        field: &'static str,
        value: &T,
    ) -> Result<(), WalkError> {
        if let Some(step) = self.path.last_mut() {
            step.field = field;
        }
        value.serialize(&mut *self)
    }

    fn leave(&mut self) -> Result<(), WalkError> {
        match self.path.pop() {
            Some(step) => check(self.visitor.leave(&self.path, step.node)),
            None => Err(WalkError(Stopped::Failed)),
        }
    }
}

fn check(flow: ControlFlow<()>) -> Result<(), WalkError> {
    match flow {
        ControlFlow::Continue(()) => Ok(()),
        ControlFlow::Break(()) => Err(WalkError(Stopped::ByVisitor)),
    }
}

/// The serializer's error: carries why the walk stopped.
#[derive(Debug)]
struct WalkError(Stopped);

impl fmt::Display for WalkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "walk stopped: {:?}", self.0)
    }
}

impl std::error::Error for WalkError {}

impl ser::Error for WalkError {
    fn custom<T: fmt::Display>(_msg: T) -> Self {
        WalkError(Stopped::Failed)
    }
}

type Res = Result<(), WalkError>;

impl<V: Visit> ser::Serializer for &mut Walker<'_, V> {
    type Ok = ();
    type Error = WalkError;
    type SerializeSeq = Self;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Self;
    type SerializeMap = Self;
    type SerializeStruct = Self;
    type SerializeStructVariant = Self;

    fn serialize_bool(self, v: bool) -> Res {
        self.leaf(Leaf::Bool(v))
    }
    fn serialize_i8(self, v: i8) -> Res {
        self.leaf(Leaf::Int(v.into()))
    }
    fn serialize_i16(self, v: i16) -> Res {
        self.leaf(Leaf::Int(v.into()))
    }
    fn serialize_i32(self, v: i32) -> Res {
        self.leaf(Leaf::Int(v.into()))
    }
    fn serialize_i64(self, v: i64) -> Res {
        self.leaf(Leaf::Int(v))
    }
    fn serialize_u8(self, v: u8) -> Res {
        self.leaf(Leaf::Int(v.into()))
    }
    fn serialize_u16(self, v: u16) -> Res {
        self.leaf(Leaf::Int(v.into()))
    }
    fn serialize_u32(self, v: u32) -> Res {
        self.leaf(Leaf::Int(v.into()))
    }
    fn serialize_u64(self, v: u64) -> Res {
        self.leaf(Leaf::Int(i64::try_from(v).unwrap_or(i64::MAX)))
    }
    fn serialize_f32(self, _v: f32) -> Res {
        Ok(())
    }
    fn serialize_f64(self, _v: f64) -> Res {
        Ok(())
    }
    fn serialize_char(self, _v: char) -> Res {
        Ok(())
    }
    fn serialize_str(self, v: &str) -> Res {
        self.leaf(Leaf::Str(v))
    }
    fn serialize_bytes(self, _v: &[u8]) -> Res {
        Ok(())
    }
    fn serialize_none(self) -> Res {
        Ok(())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Res {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Res {
        Ok(())
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Res {
        Ok(())
    }
    fn serialize_unit_variant(self, _name: &'static str, _idx: u32, _variant: &'static str) -> Res {
        Ok(())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Res {
        value.serialize(self)
    }
    /// The `Node` oneof and `A_Const`'s value: the payload is a struct whose own name
    /// identifies it, so the variant name adds nothing.
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _idx: u32,
        _variant: &'static str,
        value: &T,
    ) -> Res {
        value.serialize(self)
    }
    fn serialize_seq(self, _len: Option<usize>) -> Result<Self, WalkError> {
        Ok(self)
    }
    fn serialize_tuple(self, _len: usize) -> Result<Self, WalkError> {
        Ok(self)
    }
    fn serialize_tuple_struct(self, _name: &'static str, _len: usize) -> Result<Self, WalkError> {
        Ok(self)
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _idx: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self, WalkError> {
        Ok(self)
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<Self, WalkError> {
        Ok(self)
    }
    fn serialize_struct(self, name: &'static str, _len: usize) -> Result<Self, WalkError> {
        self.enter(name)?;
        Ok(self)
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _idx: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Self, WalkError> {
        self.enter(variant)?;
        Ok(self)
    }
}

impl<V: Visit> ser::SerializeSeq for &mut Walker<'_, V> {
    type Ok = ();
    type Error = WalkError;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Res {
        value.serialize(&mut **self)
    }
    fn end(self) -> Res {
        Ok(())
    }
}

impl<V: Visit> ser::SerializeTuple for &mut Walker<'_, V> {
    type Ok = ();
    type Error = WalkError;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Res {
        value.serialize(&mut **self)
    }
    fn end(self) -> Res {
        Ok(())
    }
}

impl<V: Visit> ser::SerializeTupleStruct for &mut Walker<'_, V> {
    type Ok = ();
    type Error = WalkError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Res {
        value.serialize(&mut **self)
    }
    fn end(self) -> Res {
        Ok(())
    }
}

impl<V: Visit> ser::SerializeTupleVariant for &mut Walker<'_, V> {
    type Ok = ();
    type Error = WalkError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Res {
        value.serialize(&mut **self)
    }
    fn end(self) -> Res {
        Ok(())
    }
}

/// Maps (parse trees have none today): keys and values are both walked.
impl<V: Visit> ser::SerializeMap for &mut Walker<'_, V> {
    type Ok = ();
    type Error = WalkError;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Res {
        key.serialize(&mut **self)
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Res {
        value.serialize(&mut **self)
    }
    fn end(self) -> Res {
        Ok(())
    }
}

impl<V: Visit> ser::SerializeStruct for &mut Walker<'_, V> {
    type Ok = ();
    type Error = WalkError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, key: &'static str, value: &T) -> Res {
        self.field(key, value)
    }
    fn end(self) -> Res {
        self.leave()
    }
}

impl<V: Visit> ser::SerializeStructVariant for &mut Walker<'_, V> {
    type Ok = ();
    type Error = WalkError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, key: &'static str, value: &T) -> Res {
        self.field(key, value)
    }
    fn end(self) -> Res {
        self.leave()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records every struct entered and every string leaf with its innermost step.
    #[derive(Default)]
    struct Recorder {
        nodes: Vec<&'static str>,
        strings: Vec<(Step, String)>,
        depth_ok: bool,
    }

    impl Visit for Recorder {
        fn enter(&mut self, _path: &[Step], node: &'static str) -> ControlFlow<()> {
            self.nodes.push(node);
            ControlFlow::Continue(())
        }
        fn leave(&mut self, path: &[Step], _node: &'static str) -> ControlFlow<()> {
            self.depth_ok = path.len() <= 64;
            ControlFlow::Continue(())
        }
        fn leaf(&mut self, path: &[Step], leaf: Leaf<'_>) -> ControlFlow<()> {
            if let (Leaf::Str(s), Some(step)) = (leaf, path.last()) {
                self.strings.push((*step, s.to_string()));
            }
            ControlFlow::Continue(())
        }
    }

    fn record(sql: &str) -> Recorder {
        let parsed = pg_query::parse(sql, 0).unwrap();
        let mut rec = Recorder::default();
        walk(&parsed.protobuf, &mut rec).unwrap();
        rec
    }

    #[test]
    fn reaches_parts_pg_query_nodes_skips() {
        // `ParseResult::nodes()` does not descend into LIMIT or VALUES; the walk does.
        let sql = "SELECT 1 LIMIT (SELECT length(f()))";
        let parsed = pg_query::parse(sql, 0).unwrap();
        let shallow = parsed
            .protobuf
            .nodes()
            .iter()
            .filter(|(n, ..)| matches!(n, pg_query::NodeRef::FuncCall(_)))
            .count();
        assert_eq!(
            shallow, 0,
            "pg_query's nodes() now reaches LIMIT; fine, but check"
        );
        let rec = record(sql);
        assert_eq!(rec.nodes.iter().filter(|n| **n == "FuncCall").count(), 2);
        let rec = record("VALUES (g())");
        assert!(rec.nodes.contains(&"FuncCall"));
    }

    #[test]
    fn string_leaves_carry_their_field() {
        let rec = record("SELECT pg_catalog.lower('A')");
        let names: Vec<_> = rec
            .strings
            .iter()
            .filter(|(s, _)| s.is("String", "sval"))
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(names, ["pg_catalog", "lower", "A"]);
        assert!(rec.depth_ok);
    }

    #[test]
    fn visitor_can_stop_the_walk() {
        struct StopAtFuncCall;
        impl Visit for StopAtFuncCall {
            fn enter(&mut self, _: &[Step], node: &'static str) -> ControlFlow<()> {
                if node == "FuncCall" {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            }
            fn leave(&mut self, _: &[Step], _: &'static str) -> ControlFlow<()> {
                ControlFlow::Continue(())
            }
            fn leaf(&mut self, _: &[Step], _: Leaf<'_>) -> ControlFlow<()> {
                ControlFlow::Continue(())
            }
        }
        let parsed = pg_query::parse("SELECT 1; SELECT now()", 0).unwrap();
        assert_eq!(
            walk(&parsed.protobuf, &mut StopAtFuncCall),
            Err(Stopped::ByVisitor)
        );
    }
}
