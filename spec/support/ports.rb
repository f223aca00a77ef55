# frozen_string_literal: true

require "socket"

# Ports for the servers the specs start.
module Ports
  # A port nothing listens on, for a server a spec starts. Taken below the
  # kernel's ephemeral range (32768 and up), in turn from a place set by the
  # process id, as the Rust tests do (tests/support/ports.rs): a port the
  # kernel picked for `:0` can be handed again as the local port of an
  # outgoing connection before the server binds it.
  FIRST_PORT = 10_000
  PORT_SPAN = 22_000
  @next = 0

  module_function

  def free_port
    start = (Process.pid * 397) % PORT_SPAN
    loop do
      n = Ports.take_next
      raise "no free port left below the ephemeral range" if n >= PORT_SPAN

      port = FIRST_PORT + ((start + n) % PORT_SPAN)
      return port if port_free?("127.0.0.1", port) && (port_free?("::", port) || !ipv6?)
    end
  end

  def port_free?(host, port)
    TCPServer.new(host, port).close
    true
  rescue SystemCallError
    false
  end

  def ipv6?
    TCPServer.new("::1", 0).close
    true
  rescue SystemCallError
    false
  end

  def take_next
    @next += 1
    @next - 1
  end
end
