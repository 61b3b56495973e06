//! Tribute's wire API (gRPC). The `.proto` files live in `proto/tribute/v1/`; the generated
//! code lands here once the daemon's services exist (issue 3).
