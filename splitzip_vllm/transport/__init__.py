"""Transport: NIXL agent wrapper, registered-buffer extent allocator, ZMQ side-channel handshake."""
