//! rope: in progress (see issue 2).
