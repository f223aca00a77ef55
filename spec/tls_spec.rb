# frozen_string_literal: true

require "spec_helper"
require "open3"

# TLS in both modes against real Puma, with curl as the client. ACME against
# Pebble lives in ext/thruster_core/tests/tls_acme.rs.
RSpec.describe "TLS" do
  let(:storage) { Dir.mktmpdir("thruster-tls") }

  # [http_version, status, body] of an HTTPS request with curl, trusting `ca`.
  def curl_https(port, path, cafile:, host: "localhost", args: ["--http2"])
    out, = Open3.capture2("curl", "-sS", "--max-time", "10", "--cacert", cafile,
                          "--resolve", "#{host}:#{port}:127.0.0.1", *args,
                          "-w", "\n%{http_version} %{http_code}", "https://#{host}:#{port}#{path}",
                          err: File::NULL)
    body, _, status = out.rpartition("\n")
    status.split << body
  end

  def wait_for_https(port, cafile)
    wait_until(timeout: 20, message: "HTTPS through the proxy") do
      result = curl_https(port, "/up", cafile:)
      result if result[1] == "200"
    end
  end

  def start_thrust(env)
    target = free_port
    ChildProcess.start(
      { "HTTP_PORT" => "0", "HTTPS_PORT" => "0", "TARGET_PORT" => target.to_s, "STORAGE_PATH" => storage }.merge(env),
      thrust_path, "puma", "-C", File.join(FIXTURES, "puma.rb"), File.join(FIXTURES, "app.ru")
    )
  end

  describe "under thrust" do
    it "serves HTTP/2 over TLS_LOCAL's certificate from Puma, and redirects the HTTP port" do
      thrust = start_thrust("TLS_LOCAL" => "1")
      https = thrust.https_port
      ca = File.join(storage, "local-cert.pem")
      expect(wait_for_https(https, ca)).to eq(%w[2 200 up])
      expect(curl_https(https, "/up", cafile: ca, args: ["--http1.1"])).to eq(%w[1.1 200 up])
      expect(File.stat(File.join(storage, "local-key.pem")).mode & 0o777).to eq(0o600)

      response = http_get(thrust.http_port, "/up?x=1", { "Host" => "localhost" })
      expect(response.code).to eq("301")
      expect(response["location"]).to eq("https://localhost:#{https}/up?x=1")
      expect(http_get(thrust.http_port, "/up", { "Host" => "example.com" }).code).to eq("421")
    end

    it "logs a failed issuance with the error, keeps serving the HTTP listener and retries" do
      closed = free_port
      thrust = start_thrust("TLS_DOMAIN" => "app.example.test", "ACME_DIRECTORY" => "https://127.0.0.1:#{closed}/dir")
      thrust.wait_for_output(/"msg":"TLS: certificate issuance failed; will retry".*"domain":"app.example.test"/)
      line = thrust.log_lines.find { |l| l["msg"].start_with?("TLS: certificate issuance failed") }
      expect(line["error"]).to match(/connect|refused/i)
      expect(line["retry_in_s"]).to be_between(7, 13)
      response = http_get(thrust.http_port, "/x", { "Host" => "app.example.test" })
      expect(response.code).to eq("301")
      expect(response["location"]).to eq("https://app.example.test:#{thrust.https_port}/x")
    end

    it "refuses bad TLS settings with exit status 2, naming the variable" do
      thrust = start_thrust("TLS_CERTIFICATE_PATH" => "/nonexistent/cert.pem")
      expect(thrust.wait.exitstatus).to eq(2)
      expect(thrust.output).to include("TLS_CERTIFICATE_PATH", "TLS_PRIVATE_KEY_PATH")

      thrust = start_thrust("TLS_CERTIFICATE_PATH" => "/nonexistent/cert.pem",
                            "TLS_PRIVATE_KEY_PATH" => "/nonexistent/key.pem")
      expect(thrust.wait.exitstatus).to eq(2)
      expect(thrust.output).to include('invalid TLS_CERTIFICATE_PATH="/nonexistent/cert.pem"')

      thrust = start_thrust("TLS_DOMAIN" => "a.example.test", "ACME_CA_FILE" => "/nonexistent/ca.pem")
      expect(thrust.wait.exitstatus).to eq(2)
      expect(thrust.output).to include("invalid ACME_CA_FILE")
    end
  end

  describe "in-process (Puma plugin)" do
    it "serves HTTP/2 over TLS from the Puma master, Puma's bind becoming the redirecting HTTP listener" do
      port = free_port
      https = free_port
      app_dir = Dir.mktmpdir("thruster-tls-inproc")
      options = { tls_local: true, https_port: https, https_bind: "127.0.0.1:#{https}", storage_path: storage }
      env = { "APP_DIR" => app_dir, "PORT" => port.to_s, "WORKERS" => "0", "RUBYLIB" => File.join(ROOT, "lib"),
              "THRUSTER_OPTIONS" => JSON.generate(options) }
      ChildProcess.start(env, RbConfig.ruby, Gem.bin_path("puma", "puma"),
                         "-C", File.join(FIXTURES, "puma_plugin.rb"), File.join(FIXTURES, "app.ru"))
      ca = File.join(storage, "local-cert.pem")
      wait_until(timeout: 20, message: "the local certificate") { File.exist?(ca) }
      expect(wait_for_https(https, ca)).to eq(%w[2 200 up])
      response = http_get(port, "/up", { "Host" => "localhost" })
      expect(response.code).to eq("301")
      expect(response["location"]).to eq("https://localhost:#{https}/up")
    end
  end
end
