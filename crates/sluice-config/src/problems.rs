//! The list of problems found while loading, shared by parsing and
//! validation (both only append to it; neither depends on the other for it).

use crate::Problem;
use crate::lines::LineMap;

/// Collected problems; lines are looked up from the path when recorded.
#[derive(Debug)]
pub(crate) struct Problems<'a> {
    lines: &'a LineMap,
    list: Vec<Problem>,
}

impl<'a> Problems<'a> {
    pub(crate) fn new(lines: &'a LineMap) -> Self {
        Problems {
            lines,
            list: Vec::new(),
        }
    }

    /// Records a problem at `path`, with the line of that path (or of its
    /// nearest ancestor in the file).
    pub(crate) fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        let path = path.into();
        let line = self.lines.line_of(&path);
        self.push_at(line, path, message);
    }

    /// Records a problem with an explicit line.
    pub(crate) fn push_at(
        &mut self,
        line: Option<usize>,
        path: impl Into<String>,
        message: impl Into<String>,
    ) {
        let problem = Problem {
            path: path.into(),
            line,
            message: message.into(),
        };
        if !self.list.contains(&problem) {
            self.list.push(problem);
        }
    }

    pub(crate) fn lines(&self) -> &'a LineMap {
        self.lines
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The problems in source order; those without a line come last.
    pub(crate) fn into_sorted(self) -> Vec<Problem> {
        let mut list = self.list;
        list.sort_by_key(|p| p.line.unwrap_or(usize::MAX));
        list
    }
}
