//! The OData `filter` of the REST API: which connections a send to all, to a group or
//! to a user reaches, and which `:addToGroups` / `:removeFromGroups` act on.
//!
//! The language is the service's subset of OData: the identifiers `userId`,
//! `connectionId` (strings, `null` when absent) and `groups` (a collection), matched
//! case-insensitively; string (`'it''s'`), integer, `true`/`false` and `null` literals;
//! `eq ne gt ge lt le`, `in` (a parenthesised list, or `groups`), `not`, `and`, `or`,
//! parentheses; and the functions `tolower toupper trim substring concat indexof length
//! startswith endswith contains`. Keywords and function names are lowercase, as in
//! OData. Precedence, tightest first: `not`, comparisons and `in`, `and`, `or` (so `not`
//! needs parentheses around a comparison). Expressions are type-checked when parsed.
//!
//! Null propagates as in OData: a function of `null` is `null`, `null eq null` is true,
//! an ordering with `null` is false, and `and`/`or`/`not` use three-valued logic. A
//! connection matches when the filter is true (not `false`, not `null`). String
//! comparisons are ordinal (case-sensitive); lengths and indexes count characters.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::HashSet;

/// Most operands and operators one filter may have.
const MAX_NODES: usize = 1000;
/// Deepest nesting of parentheses, `not` and function arguments.
const MAX_DEPTH: usize = 64;
/// Most tokens one filter may have, checked while tokenizing (so that a huge request
/// body is refused before it is held as tokens).
const MAX_TOKENS: usize = 16 * MAX_NODES;

/// A parsed, type-checked filter.
#[derive(Debug)]
pub(crate) struct Filter {
    root: Expr,
    uses_groups: bool,
}

/// The connection a filter is evaluated against.
pub(crate) struct Subject<'a> {
    pub connection_id: &'a str,
    pub user_id: Option<&'a str>,
    pub groups: &'a HashSet<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Type {
    Bool,
    Int,
    Str,
    Null,
    Collection,
}

impl Type {
    fn name(self) -> &'static str {
        match self {
            Type::Bool => "bool",
            Type::Int => "int",
            Type::Str => "string",
            Type::Null => "null",
            Type::Collection => "collection",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CmpOp {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Func {
    ToLower,
    ToUpper,
    Trim,
    Substring,
    Concat,
    IndexOf,
    Length,
    StartsWith,
    EndsWith,
    Contains,
}

#[derive(Debug, PartialEq)]
enum Expr {
    Null,
    Bool(bool),
    Int(i64),
    Str(String),
    UserId,
    ConnectionId,
    Groups,
    Not(Box<Expr>),
    And(Vec<Expr>),
    Or(Vec<Expr>),
    Cmp(CmpOp, Box<Expr>, Box<Expr>),
    /// `x in (a, b, ...)`.
    InList(Box<Expr>, Vec<Expr>),
    /// `x in groups`.
    InGroups(Box<Expr>),
    Call(Func, Vec<Expr>),
}

/// A value during evaluation; strings borrow from the subject or the filter when they can.
#[derive(Debug, PartialEq)]
enum Value<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Str(Cow<'a, str>),
}

impl Filter {
    /// Parses `text`; the error is a readable reason for a 400 answer.
    pub(crate) fn parse(text: &str) -> Result<Filter, String> {
        let tokens = tokenize(text).map_err(|e| invalid(text, &e))?;
        let mut parser = Parser {
            tokens,
            pos: 0,
            nodes: 0,
            depth: 0,
        };
        let (root, ty) = parser.or_expr().map_err(|e| invalid(text, &e))?;
        if let Some(t) = parser.tokens.get(parser.pos) {
            return Err(invalid(
                text,
                &format!("unexpected '{}' at position {}", t.text, t.at),
            ));
        }
        if ty != Type::Bool {
            return Err(invalid(
                text,
                &format!("the filter is of type {}, not bool", ty.name()),
            ));
        }
        let uses_groups = root.uses_groups();
        Ok(Filter { root, uses_groups })
    }

    /// Does the filter read `groups`? (Callers can skip collecting them otherwise.)
    pub(crate) fn uses_groups(&self) -> bool {
        self.uses_groups
    }

    /// True when the filter evaluates to true for this connection.
    pub(crate) fn matches(&self, subject: &Subject) -> bool {
        truth(&self.root, subject) == Some(true)
    }
}

fn invalid(text: &str, reason: &str) -> String {
    format!("Invalid filter '{text}': {reason}.")
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word,
    Str(String),
    Int(i64),
    Open,
    Close,
    Comma,
}

#[derive(Debug, Clone)]
struct Token {
    kind: Tok,
    text: String,
    /// Character offset in the filter.
    at: usize,
}

fn tokenize(text: &str) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if tokens.len() == MAX_TOKENS {
            return Err(format!(
                "the filter is too complex (over {MAX_TOKENS} tokens)"
            ));
        }
        let c = chars[i];
        let start = i;
        let kind = match c {
            c if c.is_whitespace() => {
                i += 1;
                continue;
            }
            '(' => {
                i += 1;
                Tok::Open
            }
            ')' => {
                i += 1;
                Tok::Close
            }
            ',' => {
                i += 1;
                Tok::Comma
            }
            '\'' => {
                let mut s = String::new();
                i += 1;
                loop {
                    match chars.get(i) {
                        None => {
                            return Err(format!(
                                "the string starting at position {start} has no closing quote"
                            ))
                        }
                        Some('\'') if chars.get(i + 1) == Some(&'\'') => {
                            s.push('\'');
                            i += 2;
                        }
                        Some('\'') => {
                            i += 1;
                            break;
                        }
                        Some(&c) => {
                            s.push(c);
                            i += 1;
                        }
                    }
                }
                Tok::Str(s)
            }
            '0'..='9' | '+' | '-' => {
                i += 1;
                while chars.get(i).is_some_and(char::is_ascii_digit) {
                    i += 1;
                }
                let literal: String = chars[start..i].iter().collect();
                match literal.parse::<i64>() {
                    Ok(n) => Tok::Int(n),
                    Err(_) => {
                        return Err(format!(
                            "'{literal}' at position {start} is not a valid integer"
                        ))
                    }
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                while chars
                    .get(i)
                    .is_some_and(|c| c.is_ascii_alphanumeric() || *c == '_')
                {
                    i += 1;
                }
                Tok::Word
            }
            other => {
                return Err(format!(
                    "unexpected character '{other}' at position {start}"
                ))
            }
        };
        tokens.push(Token {
            kind,
            text: chars[start..i].iter().collect(),
            at: start,
        });
    }
    Ok(tokens)
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
    nodes: usize,
    depth: usize,
}

type Parsed = Result<(Expr, Type), String>;

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn peek_word(&self, word: &str) -> bool {
        self.peek()
            .is_some_and(|t| t.kind == Tok::Word && t.text == word)
    }

    fn next(&mut self, wanted: &str) -> Result<Token, String> {
        let t = self
            .tokens
            .get(self.pos)
            .cloned()
            .ok_or_else(|| format!("expected {wanted} at the end"))?;
        self.pos += 1;
        Ok(t)
    }

    fn expect(&mut self, kind: Tok, wanted: &str) -> Result<(), String> {
        let t = self.next(wanted)?;
        if t.kind == kind {
            Ok(())
        } else {
            Err(format!(
                "expected {wanted} at position {}, found '{}'",
                t.at, t.text
            ))
        }
    }

    fn node(&mut self) -> Result<(), String> {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(format!(
                "the filter is too complex (over {MAX_NODES} operands and operators)"
            ));
        }
        Ok(())
    }

    fn nested<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T, String>) -> Result<T, String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(format!("the filter nests deeper than {MAX_DEPTH} levels"));
        }
        let r = f(self);
        self.depth -= 1;
        r
    }

    fn or_expr(&mut self) -> Parsed {
        self.logical("or", Self::and_expr, Expr::Or)
    }

    fn and_expr(&mut self) -> Parsed {
        self.logical("and", Self::cmp_expr, Expr::And)
    }

    /// `operand (op operand)*`, every operand bool.
    fn logical(
        &mut self,
        op: &str,
        operand: fn(&mut Self) -> Parsed,
        build: fn(Vec<Expr>) -> Expr,
    ) -> Parsed {
        let at = self.peek().map_or(0, |t| t.at);
        let (first, ty) = operand(self)?;
        if !self.peek_word(op) {
            return Ok((first, ty));
        }
        let mut items = vec![bool_operand(first, ty, op, at)?];
        while self.peek_word(op) {
            self.pos += 1;
            self.node()?;
            let at = self.peek().map_or(0, |t| t.at);
            let (e, ty) = operand(self)?;
            items.push(bool_operand(e, ty, op, at)?);
        }
        Ok((build(items), Type::Bool))
    }

    fn cmp_expr(&mut self) -> Parsed {
        let (mut left, mut lty) = self.unary()?;
        while let Some(op) = self.peek().and_then(infix) {
            let at = self.tokens[self.pos].at;
            self.pos += 1;
            self.node()?;
            left = match op {
                Infix::In => self.in_rhs(left, lty, at)?,
                Infix::Cmp(op) => {
                    let (right, rty) = self.unary()?;
                    check_comparison(op, lty, rty, at)?;
                    Expr::Cmp(op, Box::new(left), Box::new(right))
                }
            };
            lty = Type::Bool;
        }
        Ok((left, lty))
    }

    /// The right side of `in`: `groups`, `(groups)` or `(v1, v2, ...)`.
    fn in_rhs(&mut self, left: Expr, lty: Type, at: usize) -> Result<Expr, String> {
        let items: Vec<(Expr, Type)> = if self.peek().is_some_and(|t| t.kind == Tok::Open) {
            self.pos += 1;
            self.nested(|p| {
                let mut items = vec![p.or_expr()?];
                while p.peek().is_some_and(|t| t.kind == Tok::Comma) {
                    p.pos += 1;
                    items.push(p.or_expr()?);
                }
                p.expect(Tok::Close, "',' or ')'")?;
                Ok(items)
            })?
        } else {
            vec![self.unary()?]
        };
        if let [(_, Type::Collection)] = items.as_slice() {
            if !matches!(lty, Type::Str | Type::Null) {
                return Err(format!(
                    "'in groups' at position {at} needs a string, not {}",
                    lty.name()
                ));
            }
            return Ok(Expr::InGroups(Box::new(left)));
        }
        let mut values = Vec::with_capacity(items.len());
        for (e, ty) in items {
            check_comparison(CmpOp::Eq, lty, ty, at)?;
            values.push(e);
        }
        Ok(Expr::InList(Box::new(left), values))
    }

    fn unary(&mut self) -> Parsed {
        if self.peek_word("not") {
            let at = self.next("not")?.at;
            self.node()?;
            let (e, ty) = self.nested(Self::unary)?;
            if ty != Type::Bool {
                return Err(format!(
                    "'not' at position {at} needs a bool operand, not {} (put a comparison in parentheses)",
                    ty.name()
                ));
            }
            return Ok((Expr::Not(Box::new(e)), Type::Bool));
        }
        self.primary()
    }

    fn primary(&mut self) -> Parsed {
        let t = self.next("an operand")?;
        self.node()?;
        match t.kind {
            Tok::Str(s) => Ok((Expr::Str(s), Type::Str)),
            Tok::Int(n) => Ok((Expr::Int(n), Type::Int)),
            Tok::Open => self.nested(|p| {
                let inner = p.or_expr()?;
                p.expect(Tok::Close, "')'")?;
                Ok(inner)
            }),
            Tok::Close | Tok::Comma => Err(format!(
                "expected an operand at position {}, found '{}'",
                t.at, t.text
            )),
            Tok::Word => {
                if self.peek().is_some_and(|n| n.kind == Tok::Open) {
                    return self.call(&t);
                }
                match t.text.as_str() {
                    "null" => return Ok((Expr::Null, Type::Null)),
                    "true" => return Ok((Expr::Bool(true), Type::Bool)),
                    "false" => return Ok((Expr::Bool(false), Type::Bool)),
                    _ => {}
                }
                match t.text.to_ascii_lowercase().as_str() {
                    "userid" => Ok((Expr::UserId, Type::Str)),
                    "connectionid" => Ok((Expr::ConnectionId, Type::Str)),
                    "groups" => Ok((Expr::Groups, Type::Collection)),
                    _ => Err(format!(
                        "unknown identifier '{}' at position {} (use userId, connectionId or groups)",
                        t.text, t.at
                    )),
                }
            }
        }
    }

    /// `name(args)`; the name token is consumed, the `(` is next.
    fn call(&mut self, name: &Token) -> Parsed {
        let func = match name.text.as_str() {
            "tolower" => Func::ToLower,
            "toupper" => Func::ToUpper,
            "trim" => Func::Trim,
            "substring" => Func::Substring,
            "concat" => Func::Concat,
            "indexof" => Func::IndexOf,
            "length" => Func::Length,
            "startswith" => Func::StartsWith,
            "endswith" => Func::EndsWith,
            "contains" => Func::Contains,
            other => {
                return Err(format!(
                    "unknown function '{other}' at position {}",
                    name.at
                ))
            }
        };
        self.pos += 1;
        let args = self.nested(|p| {
            let mut args = vec![p.or_expr()?];
            while p.peek().is_some_and(|t| t.kind == Tok::Comma) {
                p.pos += 1;
                args.push(p.or_expr()?);
            }
            p.expect(Tok::Close, "',' or ')'")?;
            Ok(args)
        })?;
        let types: Vec<Type> = args.iter().map(|(_, t)| *t).collect();
        let stringy = |t: &Type| matches!(t, Type::Str | Type::Null);
        let (ok, result) = match func {
            Func::ToLower | Func::ToUpper | Func::Trim => {
                (types.len() == 1 && stringy(&types[0]), Type::Str)
            }
            Func::Concat => (types.len() == 2 && types.iter().all(stringy), Type::Str),
            Func::IndexOf => (types.len() == 2 && types.iter().all(stringy), Type::Int),
            Func::StartsWith | Func::EndsWith | Func::Contains => {
                (types.len() == 2 && types.iter().all(stringy), Type::Bool)
            }
            Func::Length => (
                types.len() == 1 && (stringy(&types[0]) || types[0] == Type::Collection),
                Type::Int,
            ),
            Func::Substring => (
                matches!(types.len(), 2 | 3)
                    && stringy(&types[0])
                    && args[1..].iter().all(|(e, _)| matches!(e, Expr::Int(_))),
                Type::Str,
            ),
        };
        if !ok {
            let given: Vec<&str> = types.iter().map(|t| t.name()).collect();
            return Err(format!(
                "{}({}) at position {} is not a valid call{}",
                name.text,
                given.join(", "),
                name.at,
                if func == Func::Substring {
                    " (substring takes a string and one or two integer literals)"
                } else {
                    ""
                }
            ));
        }
        Ok((
            Expr::Call(func, args.into_iter().map(|(e, _)| e).collect()),
            result,
        ))
    }
}

enum Infix {
    Cmp(CmpOp),
    In,
}

/// The comparison or `in` operator a token is, if any.
fn infix(t: &Token) -> Option<Infix> {
    if t.kind != Tok::Word {
        return None;
    }
    Some(Infix::Cmp(match t.text.as_str() {
        "eq" => CmpOp::Eq,
        "ne" => CmpOp::Ne,
        "gt" => CmpOp::Gt,
        "ge" => CmpOp::Ge,
        "lt" => CmpOp::Lt,
        "le" => CmpOp::Le,
        "in" => return Some(Infix::In),
        _ => return None,
    }))
}

fn bool_operand(e: Expr, ty: Type, op: &str, at: usize) -> Result<Expr, String> {
    if ty == Type::Bool {
        Ok(e)
    } else {
        Err(format!(
            "'{op}' needs bool operands; the one at position {at} is {}",
            ty.name()
        ))
    }
}

fn check_comparison(op: CmpOp, l: Type, r: Type, at: usize) -> Result<(), String> {
    let ordering = !matches!(op, CmpOp::Eq | CmpOp::Ne);
    let ok = match (l, r) {
        (Type::Collection, _) | (_, Type::Collection) => false,
        (Type::Null, _) | (_, Type::Null) => true,
        (Type::Bool, Type::Bool) => !ordering,
        (a, b) => a == b,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "cannot compare {} with {} at position {at}",
            l.name(),
            r.name()
        ))
    }
}

impl Expr {
    fn uses_groups(&self) -> bool {
        match self {
            Expr::Groups | Expr::InGroups(_) => true,
            Expr::Not(e) => e.uses_groups(),
            Expr::And(v) | Expr::Or(v) | Expr::Call(_, v) => v.iter().any(Expr::uses_groups),
            Expr::Cmp(_, l, r) => l.uses_groups() || r.uses_groups(),
            Expr::InList(l, v) => l.uses_groups() || v.iter().any(Expr::uses_groups),
            Expr::Null
            | Expr::Bool(_)
            | Expr::Int(_)
            | Expr::Str(_)
            | Expr::UserId
            | Expr::ConnectionId => false,
        }
    }
}

/// A bool expression: Some(b), or None for null.
fn truth(e: &Expr, s: &Subject) -> Option<bool> {
    match e {
        Expr::Not(inner) => truth(inner, s).map(|b| !b),
        Expr::And(items) => connective(items, s, false),
        Expr::Or(items) => connective(items, s, true),
        _ => match value(e, s) {
            Value::Bool(b) => Some(b),
            _ => None,
        },
    }
}

/// `and` (`decisive` false) or `or` (`decisive` true) in three-valued logic: the
/// decisive value as soon as an item has it, else null if an item is null, else the
/// other value.
fn connective(items: &[Expr], s: &Subject, decisive: bool) -> Option<bool> {
    let mut result = Some(!decisive);
    for item in items {
        match truth(item, s) {
            Some(b) if b == decisive => return Some(decisive),
            None => result = None,
            Some(_) => {}
        }
    }
    result
}

/// The order of two values of one orderable type; None when either is null.
fn order(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Int(x), Value::Int(y)) => Some(x.cmp(y)),
        (Value::Str(x), Value::Str(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

impl CmpOp {
    fn holds(self, o: Ordering) -> bool {
        match self {
            CmpOp::Eq => o == Ordering::Equal,
            CmpOp::Ne => o != Ordering::Equal,
            CmpOp::Gt => o == Ordering::Greater,
            CmpOp::Ge => o != Ordering::Less,
            CmpOp::Lt => o == Ordering::Less,
            CmpOp::Le => o != Ordering::Greater,
        }
    }
}

fn value<'a>(e: &'a Expr, s: &Subject<'a>) -> Value<'a> {
    match e {
        Expr::Null | Expr::Groups => Value::Null,
        Expr::Bool(b) => Value::Bool(*b),
        Expr::Int(n) => Value::Int(*n),
        Expr::Str(v) => Value::Str(Cow::Borrowed(v)),
        Expr::UserId => s
            .user_id
            .map_or(Value::Null, |u| Value::Str(Cow::Borrowed(u))),
        Expr::ConnectionId => Value::Str(Cow::Borrowed(s.connection_id)),
        Expr::Not(_) | Expr::And(_) | Expr::Or(_) => truth(e, s).map_or(Value::Null, Value::Bool),
        Expr::Cmp(op, l, r) => {
            let (a, b) = (value(l, s), value(r, s));
            Value::Bool(match op {
                CmpOp::Eq => a == b,
                CmpOp::Ne => a != b,
                _ => order(&a, &b).is_some_and(|o| op.holds(o)),
            })
        }
        Expr::InList(l, items) => {
            let a = value(l, s);
            Value::Bool(items.iter().any(|i| a == value(i, s)))
        }
        Expr::InGroups(l) => Value::Bool(match value(l, s) {
            Value::Str(g) => s.groups.contains(g.as_ref()),
            _ => false,
        }),
        Expr::Call(Func::Length, args) if args[0] == Expr::Groups => {
            Value::Int(s.groups.len() as i64)
        }
        Expr::Call(func, args) => {
            let vals: Vec<Value> = args.iter().map(|a| value(a, s)).collect();
            call(*func, &vals)
        }
    }
}

fn count(s: &str) -> i64 {
    s.chars().count() as i64
}

/// The characters of `s` from `start`, at most `len` of them, both clamped to `s`.
fn substring(s: &str, start: i64, len: Option<i64>) -> String {
    let skip = start.max(0) as usize;
    let take = len.map_or(usize::MAX, |l| l.max(0) as usize);
    s.chars().skip(skip).take(take).collect()
}

fn call<'a>(func: Func, args: &[Value<'a>]) -> Value<'a> {
    let mut strs = Vec::with_capacity(2);
    for a in args {
        match a {
            Value::Str(v) => strs.push(v.as_ref()),
            Value::Int(_) => {}
            Value::Null | Value::Bool(_) => return Value::Null,
        }
    }
    let int = |i: usize| match args.get(i) {
        Some(Value::Int(n)) => Some(*n),
        _ => None,
    };
    let text = |v: String| Value::Str(Cow::Owned(v));
    match func {
        Func::ToLower => text(strs[0].to_lowercase()),
        Func::ToUpper => text(strs[0].to_uppercase()),
        Func::Trim => text(strs[0].trim().to_owned()),
        Func::Concat => text(format!("{}{}", strs[0], strs[1])),
        Func::Substring => text(substring(strs[0], int(1).unwrap_or(0), int(2))),
        Func::Length => Value::Int(count(strs[0])),
        Func::IndexOf => Value::Int(
            strs[0]
                .find(strs[1])
                .map_or(-1, |byte| count(&strs[0][..byte])),
        ),
        Func::StartsWith => Value::Bool(strs[0].starts_with(strs[1])),
        Func::EndsWith => Value::Bool(strs[0].ends_with(strs[1])),
        Func::Contains => Value::Bool(strs[0].contains(strs[1])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn groups(names: &[&str]) -> HashSet<String> {
        names.iter().map(|g| g.to_string()).collect()
    }

    /// Evaluates `filter` for a connection; panics when it does not parse.
    fn eval(filter: &str, user: Option<&str>, id: &str, in_groups: &[&str]) -> bool {
        let f = Filter::parse(filter).unwrap_or_else(|e| panic!("{filter}: {e}"));
        let g = groups(in_groups);
        f.matches(&Subject {
            connection_id: id,
            user_id: user,
            groups: &g,
        })
    }

    fn alice(filter: &str) -> bool {
        eval(filter, Some("alice"), "c1", &["g1", "g2"])
    }

    fn anonymous(filter: &str) -> bool {
        eval(filter, None, "c9", &[])
    }

    fn error(filter: &str) -> String {
        Filter::parse(filter).expect_err(filter)
    }

    #[test]
    fn comparisons_on_strings() {
        assert!(alice("userId eq 'alice'"));
        assert!(!alice("userId eq 'Alice'"));
        assert!(!alice("userId ne 'alice'"));
        assert!(alice("connectionId ne '123'"));
        assert!(alice("connectionId eq 'c1'"));
        assert!(alice("userId gt 'a' and userId lt 'b'"));
        assert!(alice("userId ge 'alice' and userId le 'alice'"));
        assert!(!alice("userId gt 'alice'"));
        assert!(alice("'alice' eq userId"));
    }

    #[test]
    fn identifiers_are_case_insensitive_keywords_are_not() {
        assert!(alice(
            "USERID eq 'alice' and ConnectionID eq 'c1' and 'g1' in GROUPS"
        ));
        assert!(error("userId EQ 'alice'").contains("unexpected 'EQ'"));
        assert!(error("userId eq 'a' AND true").contains("unexpected 'AND'"));
        assert!(error("userId eq NULL").contains("unknown identifier 'NULL'"));
    }

    #[test]
    fn null_means_no_user() {
        assert!(anonymous("userId eq null"));
        assert!(!anonymous("userId ne null"));
        assert!(!alice("userId eq null"));
        assert!(alice("userId ne null"));
        assert!(anonymous("null eq userId"));
        assert!(!anonymous("userId gt 'a'"));
        assert!(!anonymous("userId lt 'a'"));
        // null propagates through functions and three-valued logic
        assert!(!anonymous("startswith(userId, 'a')"));
        assert!(!anonymous("not startswith(userId, 'a')"));
        assert!(anonymous("not startswith(userId, 'a') or true"));
        assert!(!anonymous("startswith(userId, 'a') and true"));
        assert!(!anonymous("startswith(userId, 'a') and false"));
        assert!(anonymous("not (startswith(userId, 'a') and false)"));
        assert!(anonymous("length(userId) eq null"));
    }

    #[test]
    fn group_membership() {
        assert!(alice("'g1' in groups"));
        assert!(!alice("'g3' in groups"));
        assert!(!alice("'G1' in groups"));
        assert!(alice("not('g3' in groups)"));
        assert!(!alice("not ('g1' in groups)"));
        assert!(alice("'g2' in (groups)"));
        assert!(!anonymous("'g1' in groups"));
        assert!(!anonymous("userId in groups"));
        assert!(alice("length(groups) eq 2"));
        assert!(anonymous("length(groups) eq 0"));
        assert!(Filter::parse("'g' in groups").unwrap().uses_groups());
        assert!(!Filter::parse("userId eq 'g'").unwrap().uses_groups());
    }

    #[test]
    fn in_a_list() {
        assert!(alice("userId in ('bob', 'alice')"));
        assert!(alice("userId in ('alice')"));
        assert!(!alice("userId in ('bob', 'carol')"));
        assert!(anonymous("userId in ('bob', null)"));
        assert!(alice(
            "userId in ('bob', 'carol') or connectionId in ('c1')"
        ));
        assert!(alice("length(userId) in (4, 5)"));
    }

    #[test]
    fn precedence_and_parentheses() {
        // and binds tighter than or
        assert!(alice("false and false or true"));
        assert!(!alice("false and (false or true)"));
        assert!(alice("true or false and false"));
        // not binds tightest: its operand must be bool on its own
        assert!(alice("not false and true"));
        assert!(!alice("not (false or true)"));
        assert!(error("not length(userId) gt 5").contains("'not' at position 0 needs a bool"));
        assert!(alice("not (length(userId) gt 5)"));
        assert!(alice("((userId eq 'alice'))"));
        assert!(alice(
            "userId eq 'alice' and connectionId ne '123' and (not ('g9' in groups))"
        ));
    }

    #[test]
    fn string_literals_escape_quotes() {
        assert!(eval("userId eq 'o''brien'", Some("o'brien"), "c", &[]));
        assert!(eval("userId eq ''''", Some("'"), "c", &[]));
        assert!(eval("userId eq ''", Some(""), "c", &[]));
        assert!(eval("'it''s' in groups", None, "c", &["it's"]));
        assert!(eval("userId eq 'ünï cödé'", Some("ünï cödé"), "c", &[]));
        assert!(error("userId eq 'open").contains("no closing quote"));
    }

    #[test]
    fn string_functions() {
        let user = |f: &str, u: &str| eval(f, Some(u), "c", &[]);
        assert!(user("tolower(userId) eq 'user1'", "USER1"));
        assert!(user("toupper(userId) eq 'USER1'", "user1"));
        assert!(user("trim(userId) eq 'user1'", " user1 "));
        assert!(user("substring(userId, 5, 2) eq 'ab'", "user-ab-de"));
        assert!(user("substring(userId, 5) eq 'ab-de'", "user-ab-de"));
        assert!(user("substring(userId, 50) eq ''", "user"));
        assert!(user("endswith(userId, 'de')", "user-ab-de"));
        assert!(user("startswith(userId, 'user')", "user-ab-de"));
        assert!(user("contains(userId, '-ab-')", "user-ab-de"));
        assert!(user("indexof(userId, '-ab-') eq 4", "user-ab-de"));
        assert!(user("indexof(userId, 'zz') eq -1", "user-ab-de"));
        assert!(user("indexof(userId, 'b') eq 1", "éb"));
        assert!(user(
            "length(userId) gt 1 and length(userId) le 10",
            "user-ab-de"
        ));
        assert!(user("length(userId) eq 2", "éé"));
        assert!(user("concat(userId, '!') eq 'hi!'", "hi"));
        assert!(user("not endswith(userId, 'milk')", "soy"));
    }

    #[test]
    fn type_errors_are_rejected() {
        for (filter, expected) in [
            ("userId", "of type string, not bool"),
            ("'g1'", "of type string, not bool"),
            ("userId eq 1", "cannot compare string with int"),
            ("true gt false", "cannot compare bool with bool"),
            ("groups eq 'x'", "cannot compare collection with string"),
            ("1 in groups", "needs a string, not int"),
            ("userId and true", "'and' needs bool operands"),
            ("true or 'x'", "'or' needs bool operands"),
            ("not userId", "'not' at position 0 needs a bool operand"),
            (
                "length(1) eq 1",
                "length(int) at position 0 is not a valid call",
            ),
            ("startswith(userId) eq true", "startswith(string)"),
            (
                "substring(userId, length(userId)) eq 'x'",
                "integer literals",
            ),
            ("userId in ('a', 1)", "cannot compare string with int"),
        ] {
            let e = error(filter);
            assert!(e.contains(expected), "{filter}: {e}");
        }
    }

    #[test]
    fn syntax_errors_are_rejected() {
        for (filter, expected) in [
            ("", "expected an operand at the end"),
            ("   ", "expected an operand at the end"),
            ("userId eq", "expected an operand at the end"),
            ("userId eq 'a' 'b'", "unexpected ''b'' at position 14"),
            ("(userId eq 'a'", "expected ')' at the end"),
            ("userId eq 'a')", "unexpected ')' at position 13"),
            ("userId = 'a'", "unexpected character '=' at position 7"),
            ("user eq 'a'", "unknown identifier 'user'"),
            ("frobnicate(userId)", "unknown function 'frobnicate'"),
            ("userId in ('a',)", "expected an operand at position 15"),
            (
                "length(userId) gt 99999999999999999999",
                "not a valid integer",
            ),
            ("userId eq \"a\"", "unexpected character '\"'"),
        ] {
            let e = error(filter);
            assert!(
                e.starts_with(&format!("Invalid filter '{filter}': ")),
                "{e}"
            );
            assert!(e.contains(expected), "{filter}: {e}");
        }
    }

    #[test]
    fn size_limits_are_enforced_without_overflowing_the_stack() {
        let deep = format!("{}true{}", "(".repeat(5_000), ")".repeat(5_000));
        assert!(error(&deep).contains("nests deeper than"));
        let huge = "(".repeat(1 << 20);
        assert!(error(&huge).contains("over 16000 tokens"));
        let nots = format!("{}true", "not ".repeat(10_000));
        assert!(error(&nots).contains("nests deeper than"));
        let wide = vec!["userId eq 'a'"; 2000].join(" or ");
        assert!(error(&wide).contains("too complex"));
        let fine = vec!["userId eq 'a'"; 100].join(" or ");
        assert!(!alice(&fine));
        let nested = format!(
            "{}true{}",
            "(".repeat(MAX_DEPTH - 1),
            ")".repeat(MAX_DEPTH - 1)
        );
        assert!(alice(&nested));
    }

    #[test]
    fn random_token_soup_never_panics() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        const WORDS: &[&str] = &[
            "userId",
            "connectionId",
            "groups",
            "eq",
            "ne",
            "gt",
            "le",
            "in",
            "not",
            "and",
            "or",
            "(",
            ")",
            ",",
            "'a'",
            "'it''s'",
            "'",
            "null",
            "true",
            "7",
            "-1",
            "99999999999999999999",
            "tolower(",
            "substring(",
            "concat(",
            "indexof(",
            "length(",
            "contains(",
            "trim(",
            "é",
            " ",
            "\u{0}",
        ];
        let mut rng = StdRng::seed_from_u64(7);
        let mut parsed = 0;
        for _ in 0..20_000 {
            let len = rng.random_range(1..24);
            let text: String = (0..len)
                .map(|_| WORDS[rng.random_range(0..WORDS.len())])
                .collect::<Vec<_>>()
                .join(" ");
            if let Ok(f) = Filter::parse(&text) {
                parsed += 1;
                let g = groups(&["a"]);
                for user in [Some("a"), None] {
                    f.matches(&Subject {
                        connection_id: "c",
                        user_id: user,
                        groups: &g,
                    });
                }
            }
        }
        assert!(parsed > 0, "some of the soup is a filter");
    }
}
