import zeus.qupath.extension.ZeusClient;

/** Runs the ZEUS extension's connection check for each (URL, token) pair given; one line per check: ok|message. */
public class ZeusCheck {
    public static void main(String[] args) throws Exception {
        for (int i = 0; i + 1 < args.length; i += 2) {
            String line;
            try {
                ZeusClient.Check check = new ZeusClient(args[i], args[i + 1]).check();
                line = check.ok + "|" + check.message;
            } catch (ZeusClient.ServiceException e) {
                line = "false|" + e.getMessage();
            }
            System.out.println(line);
        }
    }
}
