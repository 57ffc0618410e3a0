//! The route table: `"METHOD /path/{param}"` patterns matched to an index, without allocating.
//!
//! Requests match as axum routes them, so that no form of a request that reaches a handler
//! escapes its route's quota: a `HEAD` request falls under the `GET` route of its path when
//! no `HEAD` route matches (axum serves `HEAD` with the `GET` handler), and paths are matched
//! as sent, byte for byte (axum does not decode or fold case before routing, and sends
//! `/jobs//cancel` to `/jobs/{id}/cancel` with an empty `id`); a path that matches nothing
//! so is matched again with runs of `/` read as one (axum's nesting strips its prefix segment
//! by segment, so a doubled slash after the prefix still reaches a nested handler).

use http::{Method, Request};

use crate::error::ConfigError;

/// A route pattern split into its method (`None` for `*`, any method) and path.
#[derive(Debug, Clone)]
pub(crate) struct Pattern {
    pub(crate) method: Option<Method>,
    pub(crate) path: String,
}

impl Pattern {
    /// Parses `"METHOD /path"` or `"* /path"`. Methods are case-sensitive (RFC 9110), so a
    /// lowercase method is refused rather than silently matching nothing.
    pub(crate) fn parse(pattern: &str) -> Result<Self, ConfigError> {
        let invalid = |reason: &str| ConfigError::InvalidRoute {
            pattern: pattern.to_owned(),
            reason: reason.to_owned(),
        };
        let mut parts = pattern.split_whitespace();
        let (Some(method), Some(path), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(invalid(
                "expected a method (or `*`), one space and a path, as in `POST /v2/generate`",
            ));
        };
        let method = match method {
            "*" => None,
            m if m.bytes().any(|b| b.is_ascii_lowercase()) => {
                return Err(invalid(
                    "methods are case-sensitive: write them in uppercase",
                ))
            }
            m => Some(Method::from_bytes(m.as_bytes()).map_err(|_| invalid("invalid method"))?),
        };
        if !path.starts_with('/') {
            return Err(invalid("the path must start with `/`"));
        }
        if path.contains("//") {
            // Most likely a prefix ending in `/` joined to a path starting with one; a request
            // with `//` in its path falls under the pattern with single `/`s anyway.
            return Err(invalid(
                "an empty segment (`//`): write single `/`s; a request with `//` in its path falls under the pattern with single ones",
            ));
        }
        Ok(Self {
            method,
            path: path.to_owned(),
        })
    }
}

/// The parameters of a pattern's path, in order, as `(name, start, end)`: the name without
/// a catch-all's `*`, and where `{name}` lies in the path. `{{` and `}}` are escaped braces.
pub(crate) fn params(path: &str) -> Vec<(&str, usize, usize)> {
    let mut found = Vec::new();
    let mut at = 0;
    while let Some(offset) = path[at..].find('{') {
        let start = at + offset;
        if path[start + 1..].starts_with('{') {
            at = start + 2;
            continue;
        }
        let Some(len) = path[start + 1..].find('}') else {
            break;
        };
        let end = start + 1 + len + 1;
        let name = &path[start + 1..end - 1];
        found.push((name.strip_prefix('*').unwrap_or(name), start, end));
        at = end;
    }
    found
}

/// The path a request is routed by: the one the client sent. Inside an axum router nested
/// with `Router::nest` or `nest_service`, the request's URI has lost the prefix, and axum
/// keeps the original in `OriginalUri` (read with feature `axum`).
pub(crate) fn request_path<B>(request: &Request<B>) -> &str {
    #[cfg(feature = "axum")]
    if let Some(original) = request.extensions().get::<axum::extract::OriginalUri>() {
        return original.0.path();
    }
    request.uri().path()
}

/// `path` with every run of `/` made one.
fn single_slashes(path: &str) -> String {
    let mut single = String::with_capacity(path.len());
    for c in path.chars() {
        if !(c == '/' && single.ends_with('/')) {
            single.push(c);
        }
    }
    single
}

/// Maps a request's method and path to the index of the route it falls under.
///
/// As axum routes: the path first (the most specific pattern wins, static over parameter
/// over wildcard, whatever the methods), then among that path's routes the request's own
/// method, for `HEAD` the `GET` route, then `*`. A path whose routes all name other methods
/// falls back to the routes of the request's method (then `*`) that match less specifically,
/// then to the default.
/// Lookup walks the path once (matchit's radix tree) and allocates nothing for patterns with
/// up to three parameters.
#[derive(Debug, Clone, Default)]
pub(crate) struct RouteTable {
    /// Every path, to the routes written for it.
    paths: matchit::Router<usize>,
    /// The routes of each path in `paths`: their method (`None` for `*`) and index.
    on_path: Vec<Vec<(Option<Method>, usize)>>,
    /// Each path's text as written, to find its routes when it comes again.
    path_texts: Vec<String>,
    by_method: Vec<(Method, matchit::Router<usize>)>,
    any_method: matchit::Router<usize>,
    /// Whether `any_method` holds a route (an empty one is not searched).
    has_any_method: bool,
    default: Option<usize>,
}

impl RouteTable {
    /// Adds a route, or says why it cannot be added.
    pub(crate) fn insert(
        &mut self,
        pattern_text: &str,
        pattern: &Pattern,
        index: usize,
    ) -> Result<(), ConfigError> {
        let router = match &pattern.method {
            None => {
                self.has_any_method = true;
                &mut self.any_method
            }
            Some(method) => {
                let position = match self.by_method.iter().position(|(m, _)| m == method) {
                    Some(position) => position,
                    None => {
                        self.by_method
                            .push((method.clone(), matchit::Router::new()));
                        self.by_method.len() - 1
                    }
                };
                &mut self.by_method[position].1
            }
        };
        router
            .insert(pattern.path.as_str(), index)
            .map_err(|error| match error {
                matchit::InsertError::Conflict { with } => ConfigError::DuplicateRoute {
                    pattern: pattern_text.to_owned(),
                    existing: match &pattern.method {
                        Some(method) => format!("{method} {with}"),
                        None => format!("* {with}"),
                    },
                },
                other => ConfigError::InvalidRoute {
                    pattern: pattern_text.to_owned(),
                    reason: other.to_string(),
                },
            })?;
        self.insert_path(&pattern.path, pattern.method.clone(), index);
        Ok(())
    }

    /// Files a route under its path. A path that clashes with another's in the one tree of
    /// all paths (a parameter named otherwise at the same place) is left to the per-method
    /// trees alone.
    fn insert_path(&mut self, path: &str, method: Option<Method>, index: usize) {
        let next = self.on_path.len();
        match self.paths.insert(path, next) {
            Ok(()) => {
                self.on_path.push(vec![(method, index)]);
                self.path_texts.push(path.to_owned());
            }
            Err(matchit::InsertError::Conflict { with }) if with == path => {
                if let Some(at) = self.path_texts.iter().position(|p| *p == with) {
                    self.on_path[at].push((method, index));
                }
            }
            Err(_) => {}
        }
    }

    pub(crate) fn set_default(&mut self, index: usize) {
        self.default = Some(index);
    }

    /// The route of `method` matching `path`; for `HEAD`, else the `GET` route.
    #[inline]
    fn by_method<'r, 'p>(
        &'r self,
        method: &Method,
        path: &'p str,
    ) -> Option<matchit::Match<'r, 'p, &'r usize>> {
        let at = |wanted: &Method| {
            let (_, router) = self.by_method.iter().find(|(m, _)| m == wanted)?;
            router.at(path).ok()
        };
        match at(method) {
            None if method == Method::HEAD => at(&Method::GET),
            found => found,
        }
    }

    /// The route of `path` for `method` in the tree of all paths: its own, for `HEAD` the
    /// `GET` one, else the `*` one.
    #[inline]
    fn by_path<'r, 'p>(
        &'r self,
        method: &Method,
        path: &'p str,
    ) -> Option<(usize, matchit::Match<'r, 'p, &'r usize>)> {
        let found = self.paths.at(path).ok()?;
        let routes = &self.on_path[*found.value];
        let with = |wanted: Option<&Method>| {
            routes
                .iter()
                .find(|(m, _)| m.as_ref() == wanted)
                .map(|&(_, index)| index)
        };
        let index = with(Some(method))
            .or_else(|| (method == Method::HEAD).then(|| with(Some(&Method::GET)))?)
            .or_else(|| with(None))?;
        Some((index, found))
    }

    /// The route a request falls under and the value of the pattern's parameter named `name`,
    /// if it has one (the default route has none). The path is matched as sent only: a status
    /// route reads its job id from the path's own bytes.
    #[inline]
    pub(crate) fn lookup_param<'p>(
        &self,
        method: &Method,
        path: &'p str,
        name: &str,
    ) -> Option<(usize, Option<&'p str>)> {
        let path = if path.is_empty() { "/" } else { path };
        self.matched(method, path, |found| found.params.get(name))
            .or_else(|| self.default.map(|d| (d, None)))
    }

    /// The route a request falls under, or `None` when it matches nothing and there is no
    /// default. The path is matched as sent, as axum's router matches it (`/jobs//cancel`
    /// reaches a `/jobs/{id}/cancel` handler with an empty `id`); failing that, with runs of
    /// `/` read as one, as axum's nesting strips its prefix (`/svc//v2/generate` reaches the
    /// handler nested at `/v2/generate`).
    pub(crate) fn lookup(&self, method: &Method, path: &str) -> Option<usize> {
        let path = if path.is_empty() { "/" } else { path };
        if let Some((index, ())) = self.matched(method, path, |_| ()) {
            return Some(index);
        }
        if path.contains("//") {
            if let Some((index, ())) = self.matched(method, &single_slashes(path), |_| ()) {
                return Some(index);
            }
        }
        self.default
    }

    /// The route a pattern gives `path` (the default aside), and what `read` takes from the
    /// match: the one walk of the route trees that both lookups share.
    #[inline]
    fn matched<'r, 'p, T>(
        &'r self,
        method: &Method,
        path: &'p str,
        read: impl Fn(&matchit::Match<'r, 'p, &'r usize>) -> T,
    ) -> Option<(usize, T)> {
        if let Some((index, found)) = self.by_path(method, path) {
            return Some((index, read(&found)));
        }
        if let Some(found) = self.by_method(method, path) {
            return Some((*found.value, read(&found)));
        }
        if !self.has_any_method {
            return None;
        }
        let found = self.any_method.at(path).ok()?;
        Some((*found.value, read(&found)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(patterns: &[&str]) -> Result<RouteTable, ConfigError> {
        let mut table = RouteTable::default();
        for (i, p) in patterns.iter().enumerate() {
            table.insert(p, &Pattern::parse(p)?, i)?;
        }
        Ok(table)
    }

    #[test]
    fn matches_path_then_method_then_any_then_default() {
        let mut t = table(&[
            "POST /v2/generate",
            "GET /v2/generate/{id}",
            "* /v2/generations",
            "GET /v2/{*rest}",
        ])
        .unwrap();
        assert_eq!(t.lookup(&Method::POST, "/v2/generate"), Some(0));
        assert_eq!(t.lookup(&Method::GET, "/v2/generate/abc"), Some(1));
        assert_eq!(t.lookup(&Method::DELETE, "/v2/generations"), Some(2));
        // The more specific path wins, as in axum: `* /v2/generations` over `GET /v2/{*rest}`.
        assert_eq!(t.lookup(&Method::GET, "/v2/generations"), Some(2));
        assert_eq!(t.lookup(&Method::GET, "/v2/other"), Some(3));
        assert_eq!(t.lookup(&Method::GET, "/other"), None);
        t.set_default(9);
        assert_eq!(t.lookup(&Method::GET, "/other"), Some(9));
        assert_eq!(t.lookup(&Method::POST, "/v2/generate/abc"), Some(9));
        assert_eq!(t.lookup(&Method::GET, ""), Some(9));
    }

    #[test]
    fn the_most_specific_path_wins_whatever_the_methods_as_in_axum() {
        let t = table(&[
            "GET /x/{id}",
            "* /x/special",
            "POST /x/{id}/cancel",
            "GET /files/{*path}",
            "* /files/readme",
            "DELETE /y/static",
            "* /y/{id}",
        ])
        .unwrap();
        // axum picks the path `/x/special` first, then its method router: the `*` route.
        assert_eq!(t.lookup(&Method::GET, "/x/special"), Some(1));
        assert_eq!(t.lookup(&Method::HEAD, "/x/special"), Some(1));
        assert_eq!(t.lookup(&Method::GET, "/x/other"), Some(0));
        assert_eq!(t.lookup(&Method::HEAD, "/x/other"), Some(0));
        assert_eq!(t.lookup(&Method::GET, "/files/readme"), Some(4));
        assert_eq!(t.lookup(&Method::GET, "/files/a/b"), Some(3));
        assert_eq!(
            t.lookup_param(&Method::POST, "/x/7/cancel", "id"),
            Some((2, Some("7")))
        );
        // A path whose routes name other methods falls back to less specific ones.
        assert_eq!(t.lookup(&Method::GET, "/y/static"), Some(6));
        assert_eq!(t.lookup(&Method::DELETE, "/y/static"), Some(5));
        // Parameters named otherwise on another method still match, through its own tree.
        let t = table(&["GET /g/{id}", "DELETE /g/{generation}"]).unwrap();
        assert_eq!(
            t.lookup_param(&Method::DELETE, "/g/9", "generation"),
            Some((1, Some("9")))
        );
        assert_eq!(
            t.lookup_param(&Method::GET, "/g/9", "id"),
            Some((0, Some("9")))
        );
    }

    #[test]
    fn a_named_parameter_is_found_wherever_it_lies() {
        let t = table(&[
            "GET /v2/projects/{project}/generations/{id}",
            "GET /v2/generate/{id}",
        ])
        .unwrap();
        let path = "/v2/projects/acme/generations/gen_1";
        assert_eq!(
            t.lookup_param(&Method::GET, path, "id"),
            Some((0, Some("gen_1")))
        );
        assert_eq!(
            t.lookup_param(&Method::GET, path, "project"),
            Some((0, Some("acme")))
        );
        assert_eq!(t.lookup_param(&Method::GET, path, "other"), Some((0, None)));
        assert_eq!(
            t.lookup_param(&Method::HEAD, "/v2/generate/g", "id"),
            Some((1, Some("g")))
        );
        assert_eq!(
            params("/a/{project}/b/{*rest}"),
            [("project", 3, 12), ("rest", 15, 22)]
        );
        assert_eq!(params("/a/{{x}}/{id}"), [("id", 9, 13)]);
        assert!(params("/a/b").is_empty());
    }

    #[test]
    fn paths_match_as_sent_then_with_single_slashes() {
        let t = table(&[
            "POST /v2/jobs/{id}/cancel",
            "POST /v2/jobs/{id}",
            "POST /svc/v2/generate",
        ])
        .unwrap();
        // As axum's router: an empty segment is an empty parameter.
        assert_eq!(t.lookup(&Method::POST, "/v2/jobs//cancel"), Some(0));
        // As axum's nesting: a path that matches nothing as sent, with runs of `/` as one.
        assert_eq!(t.lookup(&Method::POST, "/svc//v2/generate"), Some(2));
        assert_eq!(t.lookup(&Method::POST, "//svc/v2//generate"), Some(2));
        assert_eq!(t.lookup(&Method::POST, "/svc/v2/other"), None);
    }

    #[test]
    fn malformed_patterns_are_errors_naming_the_pattern() {
        for bad in [
            "/v2/generate",
            "POST",
            "POST v2/generate",
            "post /v2/generate",
            "PO(ST /x",
            "GET /a /b",
            "GET /{id",
            "GET /{*rest}/x",
            "GET /v2//generate",
            "GET //v2/generate",
            "",
        ] {
            match table(&[bad]) {
                Err(ConfigError::InvalidRoute { pattern, .. }) => assert_eq!(pattern, bad),
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn duplicates_are_errors_naming_both() {
        let err = table(&["GET /v2/generate/{id}", "GET /v2/generate/{other}"]).unwrap_err();
        assert_eq!(
            err,
            ConfigError::DuplicateRoute {
                pattern: "GET /v2/generate/{other}".into(),
                existing: "GET /v2/generate/{id}".into()
            }
        );
        assert!(table(&["* /a", "* /a"]).is_err());
        // The same path under different methods is no duplicate.
        assert!(table(&["GET /a", "POST /a", "* /a"]).is_ok());
    }
}
