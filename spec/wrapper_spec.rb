# frozen_string_literal: true

require "spec_helper"

RSpec.describe "thrust wrapper" do
  def run_thrust(env, *argv, stdin: :close)
    child = ChildProcess.start(env, thrust_path, *argv, stdin:)
    status = child.wait
    [status, child.output]
  end

  let(:marker) { File.join(Dir.mktmpdir("thrust-marker"), "child-started") }
  let(:marker_child) { ["ruby", "-e", "File.write(#{marker.inspect}, 'x')"] }

  describe "proxying to a real Puma" do
    it "forwards requests with Host, X-Forwarded-* and X-Request-Start, and sets PORT for the child" do
      thrust, port = start_thrust_with_puma
      response = http_get(port, "/echo?a=1&b=2", { "Host" => "app.test:8080", "User-Agent" => "spec" })
      expect(response.code).to eq("200")
      seen = JSON.parse(response.body)
      expect(seen["path"]).to eq("/echo")
      expect(seen["query"]).to eq("a=1&b=2")
      expect(seen["headers"]).to include(
        "HTTP_HOST" => "app.test:8080",
        "HTTP_X_FORWARDED_FOR" => "127.0.0.1",
        "HTTP_X_FORWARDED_HOST" => "app.test:8080",
        "HTTP_X_FORWARDED_PROTO" => "http"
      )
      expect(seen["headers"]["HTTP_X_REQUEST_START"]).to match(/\At=\d{13}\z/)
      expect(seen["port_env"]).to eq(thrust.output[%r{Listening on http://127.0.0.1:(\d+)}, 1])
      request_log = wait_until(message: "request log line") do
        thrust.log_lines.find { |l| l["msg"] == "Request" && l["path"] == "/echo" }
      end
      expect(request_log).to include("status" => 200, "method" => "GET", "query" => "a=1&b=2",
                                     "user_agent" => "spec", "proto" => "HTTP/1.1",
                                     "resp_content_length" => response.body.bytesize)
    end

    it "streams request bodies through to the app" do
      _thrust, port = start_thrust_with_puma
      payload = "x" * 200_000
      response = Net::HTTP.start("127.0.0.1", port) { |http| http.post("/upload", payload) }
      expect(JSON.parse(response.body)["body"].bytesize).to eq(payload.bytesize)
    end

    it "finishes an in-flight request when the app is stopped by a relayed TERM" do
      thrust, port = start_thrust_with_puma
      slow = Thread.new { http_get(port, "/slow?s=1.5") }
      thrust.wait_for_output(/slow request started/)
      thrust.signal("TERM")
      expect(slow.value.code).to eq("200")
      expect(slow.value.body).to eq("slow done")
      thrust.wait
    end
  end

  describe "when the app is not answering" do
    it "answers 502 with the BAD_GATEWAY_PAGE, or an empty 502 without one" do
      dir = Dir.mktmpdir("thrust-502")
      File.write(File.join(dir, "oops.html"), "<h1>down</h1>")
      thrust = ChildProcess.start({ "HTTP_PORT" => "0", "TARGET_PORT" => free_port.to_s,
                                    "BAD_GATEWAY_PAGE" => File.join(dir, "oops.html"),
                                    "UPSTREAM_RETRY_TIMEOUT" => "0" },
                                  thrust_path, "sleep", "30")
      response = http_get(thrust.http_port, "/")
      expect(response.code).to eq("502")
      expect(response.body).to eq("<h1>down</h1>")
      expect(response["content-type"]).to start_with("text/html")

      bare = ChildProcess.start({ "HTTP_PORT" => "0", "TARGET_PORT" => free_port.to_s,
                                  "BAD_GATEWAY_PAGE" => File.join(dir, "missing.html"),
                                  "UPSTREAM_RETRY_TIMEOUT" => "0" },
                                thrust_path, "sleep", "30")
      response = http_get(bare.http_port, "/")
      expect(response.code).to eq("502")
      expect(response.body.to_s).to eq("")
    end
  end

  describe "configuration errors" do
    [
      [{ "HTTP_PORT" => "abc" }, "HTTP_PORT", "abc", "TCP port"],
      [{ "CACHE_SIZE" => "64MB" }, "CACHE_SIZE", "64MB", "bytes"],
      [{ "THRUSTER_TARGET_PORT" => "x", "TARGET_PORT" => "3000" }, "THRUSTER_TARGET_PORT", "x", "port"],
      [{ "LOG_REQUESTS" => "yes" }, "LOG_REQUESTS", "yes", "boolean"],
      [{ "HTTP_READ_TIMEOUT" => "30s" }, "HTTP_READ_TIMEOUT", "30s", "seconds"]
    ].each do |env, name, value, accepted|
      it "rejects #{env.to_a.first.join('=')} with exit 2, naming the variable, value and accepted values" do
        status, output = run_thrust(env.merge("HTTP_PORT" => env.fetch("HTTP_PORT", "0")), *marker_child)
        expect(status.exitstatus).to eq(2)
        expect(output).to include(name, value.inspect, accepted)
        expect(File.exist?(marker)).to be(false)
      end
    end

    it "treats empty values as unset" do
      status, output = run_thrust({ "HTTP_PORT" => "0", "THRUSTER_CACHE_SIZE" => "", "CACHE_SIZE" => "" },
                                  *marker_child)
      expect(status.exitstatus).to eq(0), output
      expect(File.exist?(marker)).to be(true)
    end
  end

  it "reports a busy HTTP_PORT clearly, exits 1 and never starts the child" do
    busy = TCPServer.new("0.0.0.0", 0)
    status, output = run_thrust({ "HTTP_PORT" => busy.addr[1].to_s }, *marker_child)
    expect(status.exitstatus).to eq(1)
    expect(output).to include("Failed to start HTTP listener").and include("in use")
    expect(File.exist?(marker)).to be(false)
  ensure
    busy&.close
  end

  it "binds an ephemeral port for HTTP_PORT=0 and names it in the start-up line" do
    thrust = ChildProcess.start({ "HTTP_PORT" => "0" }, thrust_path, "sleep", "30")
    port = thrust.http_port
    expect(port).to be > 0
    expect { TCPSocket.new("127.0.0.1", port).close }.not_to raise_error
  end

  describe "command line" do
    it "prints usage and exits 1 without a command" do
      status, output = run_thrust({})
      expect(status.exitstatus).to eq(1)
      expect(output).to include("missing upstream command", "Usage: thrust CMD")
    end

    it "lists every setting of docs/configuration.md with its default in --help" do
      status, output = run_thrust({}, "--help")
      expect(status.exitstatus).to eq(0)
      expect(output).to include("Usage: thrust CMD", File.join(ROOT, "docs/configuration.md"))
      # The settings table: from its header row to the first line that is not a row.
      lines = File.read(File.join(ROOT, "docs/configuration.md")).lines
      start = lines.index { |l| l.start_with?("| Variable |") }
      rows = lines.drop(start + 2).take_while { |l| l.start_with?("|") }
      expect(rows.size).to be > 30
      rows.each do |row|
        name, default = row.split(" | ").first(2)
        default = default == "–" ? "(unset)" : default.delete("`")
        expect(output).to match(/^  #{name.delete('| `')} +#{Regexp.escape(default)}$/)
      end
    end

    it "prints its version" do
      status, output = run_thrust({}, "--version")
      expect(status.exitstatus).to eq(0)
      expect(output).to include("thruster-rs", File.read(File.join(ROOT, "lib/thruster/version.rb"))[/"(.+)"/, 1])
    end

    it "exits 1 with a log line when the command cannot be started" do
      status, output = run_thrust({ "HTTP_PORT" => "0" }, "/nonexistent/app-server")
      expect(status.exitstatus).to eq(1)
      expect(output).to include("Failed to start wrapped process")
    end
  end

  describe "exit status" do
    { "exit 0" => 0, "exit 3" => 3, "exit 7" => 7 }.each do |code, expected|
      it "exits #{expected} when the child does `#{code}`" do
        status, = run_thrust({ "HTTP_PORT" => "0" }, "ruby", "-e", code)
        expect(status.exitstatus).to eq(expected)
      end
    end

    { "KILL" => 137, "TERM" => 143, "SEGV" => 139 }.each do |sig, expected|
      it "exits #{expected} (128+N) when the child dies of SIG#{sig}" do
        status, = run_thrust({ "HTTP_PORT" => "0" }, "sh", "-c", "kill -#{sig} $$; sleep 5")
        expect(status.exitstatus).to eq(expected)
      end
    end
  end

  it "relays TERM, INT, QUIT, HUP, USR1 and USR2 to the child and keeps running" do
    thrust = ChildProcess.start({ "HTTP_PORT" => "0" }, thrust_path, "ruby", File.join(FIXTURES, "signal_child.rb"))
    thrust.wait_for_output(/child ready/)
    %w[INT QUIT HUP USR1 USR2].each do |sig|
      thrust.signal(sig)
      thrust.wait_for_output(/got #{sig}/)
      expect(thrust.exited?).to be(false)
    end
    thrust.signal("INT")
    wait_until(message: "second INT") { thrust.output.scan("got INT").size == 2 }
    thrust.signal("TERM")
    expect(thrust.wait.exitstatus).to eq(0)
    relayed = thrust.log_lines.select { |l| l["msg"] == "Relaying signal to upstream process" }.map { |l| l["signal"] }
    expect(relayed).to eq(["interrupt", "quit", "hangup", "user defined signal 1", "user defined signal 2",
                           "interrupt", "terminated"])
    expect(thrust.log_lines.map { |l| l["msg"] }).to include("Server stopping", "Server stopped")
  end

  it "lets the child read thrust's stdin" do
    r, w = IO.pipe
    w.write("hello from stdin\n")
    w.close
    status, output = run_thrust({ "HTTP_PORT" => "0" }, "ruby", "-e", "print 'child read: ' + $stdin.read", stdin: r)
    r.close
    expect(status.exitstatus).to eq(0)
    expect(output).to include("child read: hello from stdin")
  end
end
