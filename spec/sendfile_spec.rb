# frozen_string_literal: true

require "spec_helper"
require "net/http"
require "fileutils"
require "time"
require "tmpdir"
require "zlib"

# X-Sendfile through `thrust` against a real Puma: the fixture's /sendfile
# answers `X-Sendfile: <path>` the way Rack::Sendfile does, and a real Rails
# app's send_file goes through the Railtie's token check.
RSpec.describe "X-Sendfile" do
  def sendfile(port, file, query = "", **options)
    identity_request(port, "/sendfile?path=#{URI.encode_www_form_component(file)}#{query}", **options)
  end

  around do |example|
    Dir.mktmpdir("thruster-sendfile") do |dir|
      @dir = File.realpath(dir)
      example.run
    end
  end

  let(:data) { Random.new(7).bytes(300_000) }
  let(:file) { File.join(@dir, "data.bin").tap { |f| File.binwrite(f, data) } }

  it "serves the file with length, type, validators and byte ranges" do
    _thrust, port = start_thrust_with_puma
    full = sendfile(port, file)
    expect(full.code).to eq("200")
    expect(full.body.b).to eq(data)
    expect(full["content-length"]).to eq(data.bytesize.to_s)
    expect(full["content-type"]).to eq("application/octet-stream")
    expect(full["accept-ranges"]).to eq("bytes")
    expect(full["x-sendfile"]).to be_nil
    expect(full["last-modified"]).to eq(File.mtime(file).httpdate)
    etag = full["etag"]
    expect(etag).to start_with('W/"')

    not_modified = sendfile(port, file, headers: { "If-None-Match" => etag })
    expect(not_modified.code).to eq("304")
    # RFC 9110 §15.4.5: validators stay, representation metadata goes.
    expect(not_modified["etag"]).to eq(etag)
    expect(not_modified.to_hash.keys & %w[content-type content-length content-encoding accept-ranges]).to be_empty
    expect(sendfile(port, file, headers: { "If-Modified-Since" => full["last-modified"] }).code).to eq("304")
    part = sendfile(port, file, headers: { "Range" => "bytes=100-199" })
    expect([part.code, part["content-range"], part.body.b]).to eq(["206", "bytes 100-199/300000", data[100, 100]])
    expect(sendfile(port, file, headers: { "Range" => "bytes=-10" }).body.b).to eq(data[-10..])
    multi = sendfile(port, file, headers: { "Range" => "bytes=0-9,200000-200009" })
    expect(multi["content-type"]).to start_with("multipart/byteranges; boundary=")
    expect(multi.body.b).to include(data[200_000, 10])
    expect(Integer(multi["content-length"])).to eq(multi.body.bytesize)
    unsatisfiable = sendfile(port, file, headers: { "Range" => "bytes=400000-" })
    expect([unsatisfiable.code, unsatisfiable["content-range"]]).to eq(["416", "bytes */300000"])
    head = sendfile(port, file, method: Net::HTTP::Head)
    expect([head.code, head["content-length"], head.body]).to eq(["200", "300000", nil])
  end

  it "honours the app's status and type, and discards a body sent alongside" do
    _thrust, port = start_thrust_with_puma
    response = sendfile(port, file, "&status=404&type=text/x-custom&body=#{'junk' * 50}")
    expect(response.code).to eq("404")
    expect(response["content-type"]).to eq("text/x-custom")
    expect(response.body.b).to eq(data)
    # The connection stays usable afterwards.
    expect(sendfile(port, file).body.b).to eq(data)
  end

  it "refuses paths outside the roots, symlinks out, directories and missing files with a logged 404" do
    thrust, port = start_thrust_with_puma
    File.symlink("/etc/hostname", File.join(@dir, "link"))
    FileUtils.mkdir_p(File.join(@dir, "sub"))
    {
      "/etc/hostname" => "outside",
      File.join(@dir, "..", "..", "etc", "hostname") => "outside",
      File.join(@dir, "link") => "outside",
      File.join(@dir, "sub") => "not a regular file",
      File.join(@dir, "missing.txt") => "no such file"
    }.each do |path, reason|
      response = sendfile(port, path)
      expect(response.code).to eq("404"), path
      expect(response.body).to eq("404 page not found\n")
      expect(response["x-content-type-options"]).to eq("nosniff")
      wait_until(message: "a log line for #{path}") do
        thrust.log_lines.any? do |l|
          l["msg"] == "X-Sendfile file refused" && l["reason"].to_s.downcase.include?(reason)
        end
      end
    end
  end

  it "serves a precompressed sibling that is not older, else compresses or sends identity" do
    _thrust, port = start_thrust_with_puma
    css = File.join(@dir, "app.css")
    text = "body { color: red; }\n" * 2000
    File.write(css, text)
    File.binwrite("#{css}.gz", Zlib.gzip(text))
    File.binwrite("#{css}.br", "not really brotli")
    File.utime(File.mtime(css) - 60, File.mtime(css) - 60, "#{css}.br") # older: ignored
    response = sendfile(port, css, headers: { "Accept-Encoding" => "br, gzip" })
    expect(response["content-encoding"]).to eq("gzip")
    expect(response["vary"]).to include("Accept-Encoding")
    expect(response.body.b).to eq(File.binread("#{css}.gz"))
    expect(response["content-length"]).to eq(File.size("#{css}.gz").to_s)
    expect(response["content-type"]).to eq("text/css; charset=utf-8")
    identity = sendfile(port, css)
    expect(identity["content-encoding"]).to be_nil
    expect(identity.body).to eq(text)
  end

  it "sends the proxy's token upstream, never a client's, and passes X-Sendfile through when disabled" do
    _thrust, port = start_thrust_with_puma
    seen = JSON.parse(identity_request(port, "/echo", headers: { "X-Thruster-Sendfile-Token" => "forged",
                                                                 "X-Accel-Mapping" => "/=/" }).body)["headers"]
    expect(seen["HTTP_X_SENDFILE_TYPE"]).to eq("X-Sendfile")
    expect(seen["HTTP_X_THRUSTER_SENDFILE_TOKEN"]).to match(/\A\h{64}\z/)
    expect(seen).not_to have_key("HTTP_X_ACCEL_MAPPING")

    _off, off_port = start_thrust_with_puma(env: { "X_SENDFILE_ENABLED" => "0" })
    forged = { "X-Sendfile-Type" => "X-Sendfile", "X-Thruster-Sendfile-Token" => "forged" }
    seen = JSON.parse(identity_request(off_port, "/echo", headers: forged).body)["headers"]
    expect(seen.keys).not_to include("HTTP_X_SENDFILE_TYPE", "HTTP_X_THRUSTER_SENDFILE_TOKEN")
    passed = sendfile(off_port, file, "&body=app+body")
    expect(passed["x-sendfile"]).to eq(file)
    expect(passed.body).to eq("app body")
  end

  it "never serves a cached reference to a file that was replaced or deleted" do
    _thrust, port = start_thrust_with_puma
    query = "&cc=public,+max-age%3D3600"
    expect(sendfile(port, file, query)["x-cache"]).to eq("miss")
    hit = sendfile(port, file, query)
    expect([hit["x-cache"], hit.body.b]).to eq(["hit", data])
    File.binwrite(file, "replaced")
    replaced = sendfile(port, file, query)
    expect([replaced["x-cache"], replaced.body]).to eq(%w[miss replaced])
    File.delete(file)
    gone = sendfile(port, file, query)
    expect([gone["x-cache"], gone.code]).to eq(%w[miss 404])
  end

  it "sends a cleartext download with sendfile(2), zero-copy", if: system("command -v strace >/dev/null") do
    thrust, port = start_thrust_with_puma
    big = File.join(@dir, "big.bin")
    File.open(big, "wb") { |f| 8.times { f.write(data * 7) } }
    trace = File.join(@dir, "strace.out")
    strace = ChildProcess.start({}, "strace", "-f", "-e", "trace=sendfile", "-o", trace, "-p", thrust.pid.to_s)
    strace.wait_for_output(/attached/)
    response = sendfile(port, big)
    expect(response.body.b).to eq(File.binread(big))
    strace.signal("INT")
    strace.wait
    calls = File.read(trace).scan(/sendfile\(\d+, \d+, \[\d+\] => \[\d+\], \d+\) = (\d+)/).flatten.map(&:to_i)
    expect(calls.sum).to eq(File.size(big))
  end

  it "writes the response head with MSG_MORE right before the sendfile(2) body, so they share a segment",
     if: system("command -v strace >/dev/null") do
    thrust, port = start_thrust_with_puma
    trace = File.join(@dir, "strace.out")
    strace = ChildProcess.start({}, "strace", "-f", "-e", "trace=sendmsg,sendfile,writev,write", "-o", trace,
                                "-p", thrust.pid.to_s)
    strace.wait_for_output(/attached/)
    response = sendfile(port, file)
    expect(response.body.b).to eq(data)
    strace.signal("INT")
    strace.wait
    calls = File.readlines(trace).grep(/\b(sendmsg|sendfile|writev|write)\(/)
    first_sendfile = calls.index { |l| l.include?("sendfile(") }
    expect(first_sendfile).not_to be_nil
    head = calls[first_sendfile - 1]
    expect(head).to include("sendmsg(").and include("MSG_MORE").and include("HTTP/1.1 200")
  end

  it "serves a real Rails app's send_file through the Railtie's token check" do
    File.write(File.join(@dir, "report.txt"), "quarterly numbers\n" * 5000)
    env = { "RUBYLIB" => File.join(ROOT, "lib"), "SENDFILE_FIXTURE_DIR" => @dir, "RAILS_ENV" => "production",
            "RUBYOPT" => nil, "BUNDLE_GEMFILE" => nil, "THRUSTER_RS_SENDFILE_TOKEN" => nil }
    _thrust, port = start_thrust_with_puma(env:, app: "rails_app/config.ru")
    response = identity_request(port, "/download")
    expect(response.code).to eq("200")
    expect(response.body).to eq("quarterly numbers\n" * 5000)
    expect(response["x-sendfile"]).to be_nil
    # Proof the proxy served it: Rails' Rack::Files sets no ETag; ours is
    # derived from size and mtime, and ranges are ours too.
    expect(response["etag"]).to start_with('W/"')
    part = identity_request(port, "/download", headers: { "Range" => "bytes=0-8" })
    expect([part.code, part.body]).to eq(%w[206 quarterly])
  end
end
