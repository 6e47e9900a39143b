//! ejabberd harness: see the production-faults issue.
