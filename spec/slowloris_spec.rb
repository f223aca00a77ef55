# frozen_string_literal: true

require "spec_helper"
require "socket"

# Slow-client defences through `thrust` in front of a real Puma: 1,000
# connections trickling a request head neither starve the app nor exhaust
# the proxy's descriptors, and a per-IP cap keeps one address from taking
# every slot. Attackers connect over 127.0.0.1; the legitimate client over ::1.
RSpec.describe "slow clients" do
  # thrust under a low soft fd limit (512), so serving 1,000 connections
  # proves it raised its own limit.
  def start_low_limit_thrust(env = {})
    target = free_port
    thrust = ChildProcess.start(
      { "HTTP_PORT" => "0", "TARGET_PORT" => target.to_s, "LOG_REQUESTS" => "false" }.merge(env),
      "sh", "-c", 'ulimit -Sn 512 && exec "$0" "$@"',
      thrust_path, "puma", "-C", File.join(FIXTURES, "puma.rb"), File.join(FIXTURES, "app.ru")
    )
    port = thrust.http_port
    wait_for_ok(port, message: "Puma behind thrust")
    [thrust, port]
  end

  # Opens `count` connections that each send part of a request head.
  def slowloris(port, count)
    Array.new(count) do
      TCPSocket.new("127.0.0.1", port).tap { |s| s.write("GET /up HTTP/1.1\r\nHost: x\r\n") }
    end
  end

  def trickle(sockets)
    sockets.each do |s|
      s.write("X-Slow: 1\r\n")
    rescue SystemCallError, IOError
      nil
    end
  end

  def closed_by_server?(socket)
    return false unless socket.wait_readable(0)

    socket.read_nonblock(1, exception: false).nil?
  rescue SystemCallError
    true
  end

  it "keeps serving the app during 1,000 slowloris connections, within its fd limit and cap" do
    thrust, port = start_low_limit_thrust
    started = thrust.log_lines.find { |l| l["msg"] == "Server started" }
    expect(started["fd_limit"]).to be > 1_000
    sockets = slowloris(port, 1_000)
    3.times do
      trickle(sockets)
      answers = Array.new(10) { http_get(port, "/up", host: "::1").code }
      expect(answers.uniq).to eq(["200"])
    end
    expect(sockets.count { |s| closed_by_server?(s) }).to eq(0)
    fds = Dir.children("/proc/#{thrust.pid}/fd").size
    expect(fds).to be_between(1_000, started["max_connections"] + 64)
    expect(File.read("/proc/#{thrust.pid}/limits")[/Max open files\s+(\d+)/, 1].to_i).to be > 512
  ensure
    sockets&.each(&:close)
  end

  it "closes connections past MAX_CONNECTIONS_PER_IP while other addresses are served" do
    _thrust, port = start_low_limit_thrust("MAX_CONNECTIONS_PER_IP" => "100")
    sockets = slowloris(port, 300)
    wait_until(message: "200 connections closed by the proxy") do
      sockets.count { |s| closed_by_server?(s) } >= 200
    end
    trickle(sockets)
    expect(sockets.count { |s| closed_by_server?(s) }).to eq(200)
    expect(http_get(port, "/up", host: "::1").code).to eq("200")
  ensure
    sockets&.each(&:close)
  end
end
