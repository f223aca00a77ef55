# frozen_string_literal: true

require "socket"
require "net/http"
require "json"
require "tmpdir"
require "timeout"
require_relative "support/child_process"
require_relative "support/ports"
require_relative "../lib/thruster/version"

ROOT = File.expand_path("..", __dir__)
FIXTURES = File.join(__dir__, "fixtures")

# Proxies started outside ChildProcess (IO.popen of a Ruby script) inherit
# this: never the checkout's ./storage/thruster, whose disk cache would
# outlive the run. ChildProcess gives each process a STORAGE_PATH of its own.
SUITE_STORAGE = Dir.mktmpdir("thruster-suite-storage")
ENV["STORAGE_PATH"] = SUITE_STORAGE
ENV.delete("THRUSTER_STORAGE_PATH")
at_exit { FileUtils.rm_rf(SUITE_STORAGE) }

module SpecHelpers
  # Inodes of the TCP sockets on `port` (listener and accepted connections).
  def tcp_inodes(port)
    hex = format("%04X", port)
    inodes = %w[/proc/net/tcp /proc/net/tcp6].flat_map do |table|
      File.readlines(table).drop(1).filter_map do |line|
        fields = line.split
        fields[9] if fields[1].end_with?(":#{hex}")
      end
    end
    inodes - ["0"]
  end

  # Inodes of the sockets a process holds open.
  def socket_inodes_of(pid)
    Dir.glob("/proc/#{pid}/fd/*").filter_map do |fd|
      File.readlink(fd)[/\Asocket:\[(\d+)\]\z/, 1]
    rescue Errno::ENOENT
      nil
    end
  end

  def free_port = Ports.free_port

  def thrust_path
    path = File.join(ROOT, "lib/thruster/thrust")
    raise "#{path} is missing: run `bundle exec rake compile` first" unless File.executable?(path)

    path
  end

  # Polls until the block returns a truthy value; a readiness probe, never a
  # fixed sleep.
  def wait_until(timeout: 10, interval: 0.05, message: "condition")
    deadline = monotonic + timeout
    loop do
      result = yield
      return result if result
      if Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline
        raise "timed out after #{timeout}s waiting for #{message}"
      end

      sleep interval
    end
  end

  def monotonic
    Process.clock_gettime(Process::CLOCK_MONOTONIC)
  end

  def http_get(port, path, headers = {}, host: "127.0.0.1")
    Net::HTTP.start(host, port, open_timeout: 5, read_timeout: 10) do |http|
      http.get(path, headers)
    end
  end

  # A request for the identity bytes (no compression), any method.
  def identity_request(port, path, headers: {}, method: Net::HTTP::Get)
    Net::HTTP.start("127.0.0.1", port, read_timeout: 20) do |http|
      http.request(method.new(path, { "Accept-Encoding" => "identity" }.merge(headers)))
    end
  end

  # Yields what arrives on `socket` until the server closes it.
  def each_chunk(socket)
    loop { yield socket.readpartial(4096) }
  rescue EOFError, Errno::ECONNRESET
    nil
  end

  # Polls `path` until it answers 200 (the app behind the proxy is up);
  # returns that response.
  def wait_for_ok(port, path = "/up", timeout: 20, message: "a 200 from #{path}")
    wait_until(timeout:, message:) do
      response = http_get(port, path)
      response if response.code == "200"
    rescue SystemCallError, EOFError, Net::ReadTimeout
      nil
    end
  end

  # Starts `thrust` in front of the fixture Puma app and waits until a
  # request passes through to the app.
  # A Unicorn (WORKERS workers, default 4) behind `thrust`.
  def start_thrust_with_unicorn(env = {})
    target = free_port
    thrust = ChildProcess.start(
      # Unicorn is not in the Gemfile: run it outside Bundler, like Debian installs it.
      { "HTTP_PORT" => "0", "TARGET_PORT" => target.to_s, "LOG_REQUESTS" => "false",
        "RUBYOPT" => nil, "BUNDLE_GEMFILE" => nil, "BUNDLE_BIN_PATH" => nil, "BUNDLER_SETUP" => nil }.merge(env),
      thrust_path, "unicorn", "-c", File.join(FIXTURES, "unicorn.rb"), File.join(FIXTURES, "app.ru")
    )
    port = thrust.http_port
    showing_output(thrust) { wait_for_ok(port, timeout: 30, message: "Unicorn behind thrust") }
    [thrust, port]
  end

  def start_thrust_with_puma(env: {}, config: "puma.rb", app: "app.ru")
    target = free_port
    thrust = ChildProcess.start(
      { "HTTP_PORT" => "0", "TARGET_PORT" => target.to_s }.merge(env),
      thrust_path, "puma", "-C", File.join(FIXTURES, config), File.join(FIXTURES, app)
    )
    port = thrust.http_port
    showing_output(thrust) { wait_for_ok(port, message: "Puma behind thrust") }
    [thrust, port]
  end

  # Runs the block; a failure in it names what `child` wrote last.
  def showing_output(child)
    yield
  rescue StandardError => e
    raise e.class, "#{e.message}\n--- last output of #{child.pid}:\n#{child.output.lines.last(40).join}"
  end
end

RSpec.configure do |config|
  config.include SpecHelpers
  config.disable_monkey_patching!
  config.order = :defined
  config.after { ChildProcess.reap_all }
end
