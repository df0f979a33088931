"""Runtime side: needs only the TVM runtime (`tvm.runtime`, `tvm_ffi`), never the compiler."""
