# frozen_string_literal: true

require "spec_helper"
require "English"

# `rake compile` while a `thrust` from lib/thruster runs (bin/demo, a test
# run): the binary and the extension are installed by rename, so the build
# succeeds and the running process keeps its own file.
RSpec.describe "rake compile" do
  it "installs over a running lib/thruster/thrust" do
    thrust = ChildProcess.start({ "HTTP_PORT" => "0", "TARGET_PORT" => free_port.to_s, "LOG_REQUESTS" => "false" },
                                thrust_path, RbConfig.ruby, "-e", "sleep")
    thrust.http_port # up and serving
    before = File.stat(thrust_path).ino

    out = IO.popen([RbConfig.ruby, "-S", "rake", "compile"], chdir: ROOT, err: %i[child out], &:read)
    expect($CHILD_STATUS).to be_success, out
    expect(out).not_to include("Text file busy")
    expect(File.stat(thrust_path).ino).not_to eq(before)
    expect(File.executable?(thrust_path)).to be(true)
    expect(thrust.exited?).to be(false)
    expect(Dir.glob(File.join(ROOT, "lib/thruster/.*.tmp.*"))).to be_empty
  end
end
