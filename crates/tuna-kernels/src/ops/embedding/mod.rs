//! embedding: in progress (see issue 2).
